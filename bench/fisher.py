"""The EWC Fisher on the demo's guest-A replay sample: one backward per utterance against batched
passes (`cltune.modeling.per_example`), for runs of each precision (the Fisher itself is fp32 arithmetic),
alternated, with the largest difference between them.

    python bench/fisher.py [--rounds 3] [--precisions fp32,bf16] [--batch-sizes 8,16,32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch-sizes", default="8,16,32")
    args = parser.parse_args(argv)
    from cltune.modeling.per_example import per_example_grads
    from cltune.strategies import create_strategy
    from cltune.strategies.ewc import fisher_diagonal

    from benchlib import demo_stream, describe_machine, machine_line, median

    print(machine_line(describe_machine()), flush=True)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    for precision in args.precisions.split(","):
        stream = demo_stream(precision=precision)
        ctx, task = stream.ctx, stream.tasks[0]
        strategy = create_strategy("ewc_replay", ctx, stream.config)
        examples = strategy.members[1].fisher_examples(task)
        positions = sum(len(s) for s in ctx.encode(examples))

        sides = {("one at a time" if b == 1 else f"batched {b}"): (
            lambda b=b, ctx=ctx, examples=examples: fisher_diagonal(per_example_grads(ctx, examples, b)))
            for b in [1, *sizes]}
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        fishers = {}
        for r in range(args.rounds):
            order = list(sides)[r % len(sides):] + list(sides)[: r % len(sides)]
            for name in order:
                start = time.perf_counter()
                fishers[name] = sides[name]()
                seconds[name].append(time.perf_counter() - start)
        reference = fishers["one at a time"]
        base = median(seconds["one at a time"])
        print(f"\n{precision}: {len(examples)} utterances, {positions} positions, {args.rounds} rounds")
        print("| side | seconds (median) | speed-up | largest relative difference of F vs one at a time |")
        print("|---|---|---|---|")
        for name in sides:
            diff = max(((fishers[name][n] - f).abs().max() / f.abs().max().clamp(min=1e-30)).item()
                       for n, f in reference.items())
            print(f"| {name} | {median(seconds[name]):.2f} | {base / median(seconds[name]):.2f}× | {diff:.1e} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
