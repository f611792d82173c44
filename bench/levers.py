"""Speed levers of cltune's training loop, each timed through the real `train_phase`, interleaved.

Variants (guest A of src/cltune/configs/demo.yaml, Naive strategy, batch 32 utterances per step):
micro_batch_size 4/8/16/32, packing (rows of --pack-length tokens), torch.set_num_threads(1),
the LM head at every position instead of only at target positions, and PEFT's own trainable-token
forward instead of scoring.py's new-token fast path. Every round runs every variant once, in a
rotated order, so drifting load from other jobs spreads over all of them.

Two levers are timed as bare micro-steps (forward + backward of the same 4 micro-batches) rather
than whole phases: bf16 autocast (`--bf16`, very slow without bf16 hardware) and torch.compile of
the scorer (`--compile`, minutes of compiling on 2 cores). `--profile` prints where a step's time goes.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/levers.py --steps 3 --rounds 3 --bf16
    .venv/bin/python bench/levers.py --variants default,mb16 --steps 2 --rounds 1
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path


@contextmanager
def threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def patched(owner, name: str, value):
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


def full_logits_forward(self, input_ids, position_ids, labels):
    """TokenScorer.forward with the LM head at every position (as a plain model call does), then the
    target positions picked out: the same result, the cost of the logits it need not compute."""
    from cltune.modeling.batching import IGNORE
    from cltune.modeling.scoring import _embed, _head

    base = self._base()
    embeds = _embed(base.get_input_embeddings(), input_ids)
    inputs = {"input_ids": input_ids} if embeds is None else {"inputs_embeds": embeds}
    hidden = base.get_decoder()(**inputs, position_ids=position_ids, use_cache=False).last_hidden_state
    logits = _head(base.get_output_embeddings(), hidden[:, :-1])
    return logits[labels[:, 1:] != IGNORE]


def variants(pack_length: int) -> dict:
    """name → (phase-setting changes, context manager factory around the run)."""
    import cltune.modeling.scoring
    from cltune.modeling.scoring import TokenScorer

    return {
        "default": ({}, nullcontext),
        "mb4": ({"micro_batch_size": 4}, nullcontext),
        "mb16": ({"micro_batch_size": 16}, nullcontext),
        "mb32": ({"micro_batch_size": 32}, nullcontext),
        "pack-mb8": ({"packing": True, "pack_length": pack_length}, nullcontext),
        "pack-mb16": ({"packing": True, "pack_length": pack_length, "micro_batch_size": 16}, nullcontext),
        "pack-mb32": ({"packing": True, "pack_length": pack_length, "micro_batch_size": 32}, nullcontext),
        "threads1": ({}, lambda: threads(1)),
        "full-logits": ({}, lambda: patched(TokenScorer, "forward", full_logits_forward)),
        "peft-new-tokens": ({}, lambda: patched(cltune.modeling.scoring, "_new_rows", lambda module: None)),
    }


def micro_batches(stream, n: int = 4, size: int = 8):
    """The first n length-grouped micro-batches of guest A's training plan, as model inputs."""
    from cltune.modeling.batching import collate, length_grouped_batches

    ctx = stream.ctx
    encoded = ctx.encode(stream.tasks[0].train)
    picked = length_grouped_batches([len(s) for s in encoded], size, seed=ctx.seed)[:n]
    return [collate(encoded, mb, ctx.tokenizer.pad_token_id) for mb in picked]


def micro_step(stream, scorer, batches, autocast: bool = False) -> tuple[float, int]:
    """Seconds and target tokens of forward + backward over `batches` (gradients then dropped)."""
    import torch

    from cltune.modeling.scoring import target_nll

    start = time.perf_counter()
    for batch in batches:
        inputs = batch.model_inputs()
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
            loss = target_nll(scorer(**inputs), inputs["labels"]).mean()
        loss.backward()
    stream.ctx.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, sum(b.n_targets for b in batches)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (32 utterances each)")
    p.add_argument("--same-data", action="store_true",
                   help="every variant trains the same seeded steps×32 utterances for one epoch (micro-batch sizes "
                        "otherwise draw different utterances into their first steps)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--pack-length", type=int, default=256)
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast on one micro-batch (fp32 beside it)")
    p.add_argument("--compile", action="store_true", help="also try torch.compile of the scorer (slow to compile)")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's op table for forward + backward of 8 micro-batches of 8")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cltune.strategies import create_strategy

    from benchlib import (
        demo_stream,
        describe_machine,
        load1,
        machine_line,
        median,
        phase_settings,
        run_cltune,
        table,
        with_small_val,
        write_json,
    )

    machine = describe_machine()
    print(machine_line(machine), flush=True)
    stream = demo_stream()
    task = with_small_val(stream.tasks[0])
    if args.same_data:
        task = replace(task, train=random.Random(0).sample(task.train, 32 * args.steps))
    strategy = create_strategy("naive", stream.ctx, stream.config)
    table_of = variants(args.pack_length)
    names = args.variants.split(",") if args.variants else list(table_of)
    unknown = [n for n in names if n not in table_of]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(table_of)}")

    run_cltune(stream, strategy, task, phase_settings(stream.config, 1))  # warm-up
    results: dict[str, list] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            changes, around = table_of[name]
            with around():
                settings = phase_settings(stream.config, args.steps, **changes)
                if args.same_data:
                    settings = settings.model_copy(update={"epochs": 1})
                results[name].append(run_cltune(stream, strategy, task, settings))
        print(f"round {r + 1}: " + ", ".join(f"{n} {results[n][-1].tokens_per_s:.1f}" for n in names), flush=True)

    base = median(t.tokens_per_s for t in results[names[0]])
    rows = [[n, f"{median(t.tokens_per_s for t in results[n]):.1f}",
             f"{median(t.tokens_per_s for t in results[n]) / base:.2f}",
             " ".join(f"{t.tokens_per_s:.1f}" for t in results[n]), f"{median(t.load1 for t in results[n]):.1f}"]
            for n in names]
    print()
    print(table(["variant", "median tok/s", f"vs {names[0]}", "per round", "load1"], rows))
    payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine, "settings": vars(args),
               "results": {n: [vars(t) for t in ts] for n, ts in results.items()}}

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        batches = micro_batches(stream, n=8)
        micro_step(stream, stream.ctx.scorer.train(), batches)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            seconds, targets = micro_step(stream, stream.ctx.scorer, batches)
        positions = sum(b.input_ids.numel() for b in batches)
        print(f"\nprofile: 8 micro-batches, {positions} positions "
              f"({100 * (1 - sum(b.n_tokens for b in batches) / positions):.1f}% "
              f"pads), {targets} targets, {seconds:.2f} s under the profiler, load {load1()}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if args.bf16 or args.compile:
        batches = micro_batches(stream)
        scorer = stream.ctx.scorer.train()
        micro_step(stream, scorer, batches)  # warm-up
    if args.bf16:
        one = batches[:1]
        fp32 = [micro_step(stream, scorer, one) for _ in range(2)]
        bf16 = [micro_step(stream, scorer, one, autocast=True) for _ in range(2)]
        payload["bf16"] = {"fp32_s": [t for t, _ in fp32], "bf16_s": [t for t, _ in bf16], "tokens": fp32[0][1],
                           "load1": load1()}
        print(f"\nbf16 autocast, one micro-batch of 8 ({fp32[0][1]} targets), forward+backward: fp32 "
              f"{min(t for t, _ in fp32):.2f} s, bf16 {min(t for t, _ in bf16):.2f} s "
              f"({min(t for t, _ in bf16) / min(t for t, _ in fp32):.1f}× slower), load {load1()}")
    if args.compile:
        import torch

        compiled = torch.compile(scorer, dynamic=True)
        start = time.perf_counter()
        micro_step(stream, compiled, batches)
        first = time.perf_counter() - start
        eager, comp = [], []
        for _ in range(3):
            eager.append(micro_step(stream, scorer, batches)[0])
            comp.append(micro_step(stream, compiled, batches)[0])
        payload["compile"] = {"first_call_s": first, "eager_s": eager, "compiled_s": comp, "load1": load1()}
        print(f"\ntorch.compile(scorer, dynamic=True): first call {first:.0f} s; 4 micro-batches fwd+bwd: eager "
              f"{median(eager):.2f} s, compiled {median(comp):.2f} s (median of 3, interleaved), load {load1()}")
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
