"""Training throughput of cltune's loop against a plain PEFT loop, the reference pipeline's stack, and the ceiling.

Both sides train the same bundled model (SmolLM2-135M-Instruct + LoRA r16, α32, dropout .05 on
q,k,v,o) on the same utterances (guest A's train split of src/cltune/configs/demo.yaml) on this machine:

- baseline, written the way the reference pipeline did it: HF `Trainer` + PEFT, every utterance padded to
  max_length=100, batch 2 × gradient accumulation 16, fp32, full-vocabulary logits;
- anchor (`bench/anchor.py`), per precision: the smallest honest PEFT + PyTorch loop on the same model,
  LoRA shape, utterances and batch size, each batch padded to its longest, one forward and backward
  per step; cltune's ratio to it, paired round by round, is the figure issue 30 holds cltune to;
- cltune: the real `cltune.training.loop.train_phase` (Naive strategy, the Context built as
  `cltune.studies.pipeline.run` builds it) with the config's defaults (`micro_batch_size: auto`, LM head
  only at target positions), once per precision: fp32, and bf16 (base in bf16, matmuls in bf16,
  the rest fp32) where the CPU has AVX-512 BF16/AMX or the GPU has bf16.

Runs alternate (A B, then B A, …) after a warm-up run of each, so load from other jobs hits both
sides alike. Throughput counts real target tokens (every non-pad token of an utterance but its
speaker token) per second, from the start of each run's loop (optimizer built) to the end of its
last optimizer step; the baseline's clock is a Trainer callback, cltune's is its own train log.

FLOP count: a frozen base with LoRA costs ≈ 4·N FLOP per target token (forward 2N, backward
through the activations 2N; no weight gradients for the frozen base), N = base parameters with the
tied embedding counted once (as the LM head). LoRA's own FLOPs and attention are ignored.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/throughput.py   # 3 rounds (~10 min on 2 cores)
    .venv/bin/python bench/throughput.py --skip-baseline --rounds 5   # anchor vs cltune: median and spread
    .venv/bin/python bench/throughput.py --steps 2 --rounds 1 --json out.json
    .venv/bin/python bench/throughput.py --device cuda --micro-batch-size 128 --batch-size 256 --packing
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="cltune optimizer steps per run")
    p.add_argument("--baseline-steps", type=int, default=1,
                   help="baseline optimizer steps per run (each is 32 utterances padded to 100: ~1 min on 2 cores)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved baseline/cltune rounds after the warm-up")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--model", default=None,
                   help="model.name for both sides (default: the config's bundled model), e.g. a "
                        "folder with SmolLM2's config and random weights on a GPU machine")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="cltune micro-batch (default: the config's, auto)")
    p.add_argument("--precisions", default=None, help="cltune sides, e.g. fp32,bf16 (default: fp32, and bf16 where "
                                                       "the CPU/GPU has native bf16)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="cltune utterances per optimizer step (default: the config's)")
    p.add_argument("--packing", action="store_true", help="cltune: pack utterances into rows of --pack-length")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a cltune train setting for its sides, e.g. max_micro_batch_tokens=1024 (repeatable)")
    p.add_argument("--pack-length", type=int, default=256)
    p.add_argument("--skip-baseline", action="store_true", help="leave out the reference pipeline's stack (slow)")
    p.add_argument("--skip-anchor", action="store_true", help="leave out the plain PEFT loop")
    p.add_argument("--uniform-length", type=int, default=None,
                   help="train every side on utterances of exactly this many tokens (data.max_length N, and only "
                        "the utterances that fill it): no padding for any loop to save")
    p.add_argument("--peak-seconds", type=float, default=2.0, help="time spent on the fp32 matmul peak per round")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    return p.parse_args(argv)


def matmul_peak(torch, dtype, device: str, n: int, budget_s: float) -> float:
    """Best FLOP/s of an n×n×n matmul on all threads, repeated for about `budget_s` seconds."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < budget_s or best == float("inf"):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class TokenCounter:
    """Counts the target tokens the baseline model actually trains on (a forward pre-hook)."""

    def __init__(self):
        self.tokens = 0

    def __call__(self, module, args, kwargs):
        labels = kwargs.get("labels")
        if labels is not None and module.training:
            self.tokens += int((labels[:, 1:] != -100).sum())


def baseline_model(stream, device: str):
    """The reference pipeline's model: same base, same added tokens, plain PEFT LoRA (no trainable token rows)."""
    from peft import LoraConfig, get_peft_model

    from cltune.modeling.model import add_special_tokens, load_base, resize_for

    model, tokenizer = load_base(stream.config.model)
    add_special_tokens(tokenizer, stream.speaker_tokens)
    resize_for(model, tokenizer)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora).to(device), tokenizer


def padded_dataset(torch, encoded: list[list[int]], pad_id: int, max_length: int = 100):
    """Every utterance padded to max_length, labels -100 at pads (the reference pipeline's collator does the same)."""
    rows = []
    for seq in encoded:
        pad = max_length - len(seq)
        rows.append({"input_ids": torch.tensor(seq + [pad_id] * pad),
                     "attention_mask": torch.tensor([1] * len(seq) + [0] * pad),
                     "labels": torch.tensor(seq + [-100] * pad)})
    return rows


def run_baseline(model, dataset, steps: int, device: str, counter: TokenCounter):
    """One HF Trainer run of `steps` optimizer steps, timed at the end of each step."""
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from benchlib import load1, window

    points = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # after the optimizer is built, as in train_phase
            points.append((time.perf_counter(), counter.tokens))

        def on_step_end(self, args, state, control, **kwargs):
            points.append((time.perf_counter(), counter.tokens))

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=2, gradient_accumulation_steps=16, max_steps=steps,
            learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=round(0.1 * steps),
            logging_strategy="no", save_strategy="no",
            report_to="none", use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                callbacks=[StepClock()]).train()
    return window(points, load1())


def uniform(stream, length: int | None):
    """Guest A's task; with `length`, only its training utterances whose encoding fills `length` tokens."""
    from dataclasses import replace

    from cltune.modeling.batching import encode

    task = stream.tasks[0]
    if not length:
        return task
    encoded = encode(task.train, stream.ctx.tokenizer, length)
    return replace(task, train=[e for e, ids in zip(task.train, encoded) if len(ids) == length])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from cltune.modeling.batching import encode
    from cltune.strategies import create_strategy
    from cltune.training.loop import micro_batch
    from cltune.training.session import cpu_supports_bf16

    from benchlib import (
        demo_stream,
        describe_machine,
        machine_line,
        median,
        phase_settings,
        run_cltune,
        table,
        with_small_val,
        write_json,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = describe_machine()
    print(machine_line(machine), flush=True)
    native_bf16 = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_supports_bf16()
    precisions = args.precisions.split(",") if args.precisions else (["fp32", "bf16"] if native_bf16 else ["fp32"])

    overrides = [f"model.name={args.model}"] if args.model else []
    if args.uniform_length:
        overrides.append(f"data.max_length={args.uniform_length}")
    sides = {}  # cltune side name → (stream, strategy, task, settings(steps))
    for precision in precisions:
        stream = demo_stream(overrides=[*overrides, f"model.precision={precision}"])
        config = stream.config
        changes = {k: v for k, v in {"micro_batch_size": args.micro_batch_size, "batch_size": args.batch_size}.items()
                   if v}
        changes.update(packing=args.packing, pack_length=args.pack_length)
        changes.update(dict(item.split("=", 1) for item in args.train_set))
        resolved = micro_batch(phase_settings(config, 1, **changes), wide=precision != "fp32" or device != "cpu")
        sides[f"cltune {precision} mb{resolved}"] = (
            stream, create_strategy("naive", stream.ctx, config), with_small_val(uniform(stream, args.uniform_length)),
            lambda steps, config=config, changes=changes: phase_settings(config, steps, **changes), precision)
    first = next(iter(sides.values()))[0]
    anchors = {}  # precision → (model, batches): the plain loop beside each cltune side
    if not args.skip_anchor:
        from anchor import anchor_batches, anchor_model, run_anchor

        for stream, _, task, settings, precision in sides.values():
            model, tokenizer = anchor_model(stream, precision, device)
            encoded = encode(task.train, tokenizer, stream.config.data.max_length)
            anchors[precision] = (model, anchor_batches(encoded, settings(1).batch_size, tokenizer.pad_token_id))
    if not args.skip_baseline:
        model, tokenizer = baseline_model(first, device)
        counter = TokenCounter()
        model.register_forward_pre_hook(counter, with_kwargs=True)
        dataset = padded_dataset(torch, encode(first.tasks[0].train, tokenizer, first.config.data.max_length),
                                 tokenizer.pad_token_id)

    # bf16 matmuls without bf16 hardware take minutes at 2048³: a 512³ one says enough there.
    bf16_n = 2048 if native_bf16 or device == "cuda" else 512
    peaks = {"bf16_n": bf16_n, "fp32": [], "bf16": []}
    print("warm-up …", flush=True)
    for stream, strategy, task, settings, _ in sides.values():
        run_cltune(stream, strategy, task, settings(1))
    if not args.skip_baseline:
        run_baseline(model, dataset, 1, device, counter)
    for precision, (anchor, batches) in anchors.items():
        run_anchor(anchor, batches, 1, precision, device)

    names = (["baseline"] if not args.skip_baseline else []) + [f"anchor {p}" for p in anchors] + list(sides)
    rounds = []
    for r in range(args.rounds):
        got = {}
        for name in names if r % 2 == 0 else names[::-1]:  # alternate the order so load hits every side alike
            if name == "baseline":
                got[name] = run_baseline(model, dataset, args.baseline_steps, device, counter)
            elif name.startswith("anchor "):
                precision = name.split()[1]
                anchor, batches = anchors[precision]
                # the same batches every round (after the warm-up's), as cltune's side runs the same steps
                got[name] = run_anchor(anchor, batches[1:], args.steps, precision, device)
            else:
                stream, strategy, task, settings, _ = sides[name]
                got[name] = run_cltune(stream, strategy, task, settings(args.steps))
        peaks["fp32"].append(matmul_peak(torch, torch.float32, device, 2048, args.peak_seconds))
        peaks["bf16"].append(matmul_peak(torch, torch.bfloat16, device, bf16_n, args.peak_seconds / 2))
        rounds.append({name: got[name] for name in names})
        print(f"round {r + 1}: " + ", ".join(f"{k} {v.tokens_per_s:.1f} tok/s (load {v.load1})"
                                             for k, v in got.items()),
              flush=True)

    n_params = first.base_params
    summary = {"base_params": n_params, "fp32_peak_flops_median": median(peaks["fp32"]),
               "bf16_peak_flops_median": median(peaks["bf16"]), "sides": {}}
    rows = []

    def precision_of(name: str) -> str:
        return "fp32" if name == "baseline" else name.split()[1] if name.startswith("anchor ") else sides[name][4]

    for name in names:
        runs = [r[name].tokens_per_s for r in rounds]
        tps = median(runs)
        # each cltune side against the plain loop of its precision, paired round by round; the others against
        # the reference pipeline's stack (or, without it, the first side)
        reference = f"anchor {precision_of(name)}" if f"anchor {precision_of(name)}" in names and not \
            name.startswith("anchor ") else names[0]
        ratios = [r[name].tokens_per_s / r[reference].tokens_per_s for r in rounds]
        precision = precision_of(name)
        peak = summary["bf16_peak_flops_median" if precision == "bf16" else "fp32_peak_flops_median"]
        share = 4 * n_params * tps / peak
        summary["sides"][name] = {"tokens_per_s": tps, "tokens_per_s_runs": runs, "against": reference,
                                  "ratio": median(ratios), "ratios": ratios, "precision": precision,
                                  "share_of_peak": share, "step_s": median(r[name].step_s for r in rounds)}
        rows.append([name, f"{tps:.1f}", f"{min(runs):.1f}–{max(runs):.1f}", f"{median(ratios):.2f}× {reference}",
                     f"{min(ratios):.2f}–{max(ratios):.2f}", precision, f"{peak / 1e9:.0f}", f"{100 * share:.1f}%"])
    print()
    print(table(["side", "tok/s (median)", "spread", "ratio (median, paired)", "ratio spread", "matmuls",
                 "peak GFLOP/s", "share of peak"], rows))
    print(f"\n{len(rounds)} rounds")
    print(f"\nmatmul peak ({device}, {torch.get_num_threads()} threads): "
          f"fp32 2048³ {summary['fp32_peak_flops_median'] / 1e9:.0f} "
          f"GFLOP/s, bf16 {bf16_n}³ {summary['bf16_peak_flops_median'] / 1e9:.0f} GFLOP/s (medians over rounds); "
          f"share of peak = 4·N·tok/s with N = {n_params / 1e6:.1f}M against the peak of the precision the side used")
    write_json(args.json, {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine,
                           "settings": {**vars(args)}, "rounds": [{k: vars(v) for k, v in r.items()} for r in rounds],
                           "peaks": peaks, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
