"""Continual-learning overheads as a share of phase time, on the demo stream (guest A → guest B).

- Fisher (EWC): `fisher_diagonal(per_example_grads(...))` on guest A's replay sample, the work
  `ewc`'s after_task does once after phase 1; its share = that time / phase 1's training time
  (phase 1's target tokens ÷ the Naive loop's measured tokens/s in this process).
- Per-step costs in phase 2: the real `train_phase` on guest B with each strategy set up as after
  phase 1 (Fisher and θ*, replay buffer, LwF teacher, A-GEM memory), interleaved with Naive; the
  overhead is Naive's tokens/s ÷ the strategy's − 1 (extra seconds per trained token). The parts
  are also timed alone per micro-batch / step: the EWC penalty (forward + backward), the LwF
  teacher pass, the A-GEM reference gradient and projection.
- Replay mixing: the cost of building the mixed, shuffled step plan, and the extra tokens replay
  adds (that is the method's data, not overhead).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/cl_overheads.py --steps 3 --rounds 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

STRATEGIES = ["naive", "ewc_replay", "lwf", "agem"]
PART_LABELS = {
    "ewc_penalty_per_step_s": "EWC penalty, fwd+bwd, once per optimizer step",
    "lwf_teacher_per_step_s": "LwF teacher pass, once per micro-batch",
    "agem_reference_per_step_s": "A-GEM reference gradient (16 memory utterances)",
    "agem_projection_per_step_s": "A-GEM flatten + projection",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="phase-2 optimizer steps per run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="first one is the reference")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def target_tokens(ctx, examples) -> int:
    return sum(len(s) - 1 for s in ctx.encode(examples))


def part_timings(stream, strategies: dict, task_b, micro_batch_size: int, batch_size: int) -> dict:
    """Seconds of each strategy's own work for one optimizer step of phase 2, timed alone."""
    import torch

    from cltune.modeling.batching import collate, length_grouped_batches
    from cltune.strategies.ewc import ewc_penalty

    ctx = stream.ctx
    encoded = ctx.encode(task_b.train)
    batches = [collate(encoded, mb, ctx.tokenizer.pad_token_id)
               for mb in length_grouped_batches([len(s) for s in encoded], micro_batch_size,
                                                seed=0)[: batch_size // micro_batch_size]]
    out = {}
    if "ewc_replay" in strategies:
        ewc = strategies["ewc_replay"].members[1]
        start = time.perf_counter()
        ewc_penalty(ctx.trainable(), ewc.anchors, ewc.cfg.lambda_).backward()  # step_penalty: once per step
        out["ewc_penalty_per_step_s"] = time.perf_counter() - start
        ctx.model.zero_grad(set_to_none=True)
    if "lwf" in strategies:
        lwf = strategies["lwf"]
        start = time.perf_counter()
        for batch in batches:
            lwf.teacher_logits(batch.model_inputs())
        out["lwf_teacher_per_step_s"] = time.perf_counter() - start
    if "agem" in strategies:
        from cltune.strategies.agem import agem_project
        from cltune.strategies.base import StepInfo
        from cltune.strategies.shared import flatten

        agem, params = strategies["agem"], ctx.trainable()
        step = StepInfo(phase=1, step=1, steps=1, epoch=0)
        out["agem_reference_per_step_s"], reference = timed(agem.reference_gradient, params, step)
        # A conflicting step gradient (−g_ref), so the projection really happens.
        for p, chunk in zip(params.values(), torch.split(-reference, [p.numel() for p in params.values()])):
            p.grad = chunk.view_as(p).clone()
        out["agem_projection_per_step_s"], _ = timed(
            lambda: agem_project(flatten([p.grad for p in params.values()], params), reference))
        ctx.model.zero_grad(set_to_none=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from cltune.strategies import create_strategy
    from cltune.strategies.ewc import fisher_diagonal, per_example_grads
    from cltune.training.loop import plan_steps

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
    ctx, config = stream.ctx, stream.config
    task_a, task_b = with_small_val(stream.tasks[0]), with_small_val(stream.tasks[1])
    names = args.strategies.split(",")
    strategies = {n: create_strategy(n, ctx, config) for n in names}

    # Phase 1's end for every strategy (no training: the costs do not depend on the weights' values).
    setup = {}
    for name, strategy in strategies.items():
        setup[name], _ = timed(strategy.after_task, task_a)
        strategy.before_task(task_b)
    print("after_task(guest A) seconds: " + ", ".join(f"{n} {s:.1f}" for n, s in setup.items()), flush=True)

    fisher_examples = strategies["ewc_replay"].members[1].fisher_examples(task_a) if "ewc_replay" in strategies else []
    settings2 = phase_settings(config, args.steps)
    run_cltune(stream, strategies[names[0]], task_b, phase_settings(config, 1), phase=1)  # warm-up
    results = {n: [] for n in names}
    fisher_s, naive_a, parts = [], [], []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            results[name].append(run_cltune(stream, strategies[name], task_b, settings2, phase=1))
        naive_a.append(run_cltune(stream, strategies[names[0]], task_a, settings2, phase=0))
        if fisher_examples:
            fisher_s.append(timed(lambda: fisher_diagonal(per_example_grads(ctx, fisher_examples)))[0])
        parts.append(part_timings(stream, strategies, task_b, settings2.micro_batch_size, settings2.batch_size))
        print(f"round {r + 1}: " + ", ".join(f"{n} {results[n][-1].tokens_per_s:.1f}" for n in names)
              + f"; naive on A {naive_a[-1].tokens_per_s:.1f} tok/s; "
              f"Fisher {fisher_s[-1] if fisher_s else float('nan'):.1f} s",
              flush=True)

    ref = median(t.tokens_per_s for t in results[names[0]])
    step_s = median(t.step_s for t in results[names[0]])
    rows = []
    for n in names:
        tps = median(t.tokens_per_s for t in results[n])
        rows.append([f"phase 2 step, {n}", f"{tps:.1f} tok/s", f"{100 * (ref / tps - 1):+.0f}%",
                     " ".join(f"{t.tokens_per_s:.1f}" for t in results[n]),
                     f"{median(t.load1 for t in results[n]):.1f}"])
    for key in parts[0]:
        s = median(p[key] for p in parts)
        rows.append([PART_LABELS[key], f"{s:.3f} s/step", f"{100 * s / step_s:.1f}% of a {step_s:.1f} s naive step",
                     " ".join(f"{p[key]:.3f}" for p in parts), ""])

    summary = {"naive_phase2_tokens_per_s": ref, "naive_phase2_step_s": step_s,
               "parts_median": {k: median(p[k] for p in parts) for k in parts[0]}}
    if fisher_s:
        phase1 = plan_steps([len(s) for s in ctx.encode(stream.tasks[0].train)], config.phase(0), config.seed)
        encoded_a = ctx.encode(stream.tasks[0].train)
        phase1_tokens = sum(len(encoded_a[i]) - 1 for _, mbs in phase1 for mb in mbs for i in mb)
        phase1_s = phase1_tokens / median(t.tokens_per_s for t in naive_a)
        summary.update(fisher_s=median(fisher_s), fisher_examples=len(fisher_examples),
                       phase1_target_tokens=phase1_tokens, phase1_train_s_estimate=phase1_s)
        rows.append([f"Fisher, {len(fisher_examples)} utterances one by one", f"{median(fisher_s):.1f} s",
                     f"{100 * median(fisher_s) / phase1_s:.1f}% of phase 1 (~{phase1_s:.0f} s)",
                     " ".join(f"{s:.1f}" for s in fisher_s), ""])
    if "ewc_replay" in strategies:
        replay = strategies["ewc_replay"]
        mix_s, mixed = timed(lambda: plan_steps([len(s) for s in ctx.encode(replay.train_data(task_b))],
                                                config.phase(1), config.seed + 1))
        extra = target_tokens(ctx, replay.members[0].buffer.examples()) / target_tokens(ctx, task_b.train)
        summary.update(replay_mixing_s=mix_s, replay_extra_token_share=extra)
        rows.append(["replay mixing (train_data + encode + plan)", f"{mix_s:.3f} s",
                     f"+{100 * extra:.0f}% tokens trained", "", ""])
    print()
    print(table(["what", "cost", "overhead", "per round", "load1"], rows))
    write_json(args.json, {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine,
                           "settings": vars(args),
                           "setup_s": setup, "results": {n: [vars(t) for t in ts] for n, ts in results.items()},
                           "naive_phase1": [vars(t) for t in naive_a], "fisher_s": fisher_s, "parts": parts,
                           "summary": summary,
                           "load1_end": load1()})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
