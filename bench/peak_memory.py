"""Where the demo's peak memory comes from: the process's peak RSS around one training micro-batch
(forward + backward, fp32) or one evaluation batch made of guest A's longest utterances.

Run one case per process: the peak (VmHWM) is reset after the model is built, and memory the
allocator keeps after one case would hide the next.

    .venv/bin/python bench/peak_memory.py --micro-batch 8           # training, the 8 longest utterances
    .venv/bin/python bench/peak_memory.py --micro-batch 32 --eval   # evaluation batch of the 32 longest
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--micro-batch", type=int, default=8,
                   help="utterances in the batch (the longest of guest A's train split)")
    p.add_argument("--eval", action="store_true", help="a no-grad evaluation batch instead of a training micro-batch")
    args = p.parse_args(argv)

    import torch

    from cltune.evaluation.evaluate import example_nll
    from cltune.modeling.batching import collate
    from cltune.modeling.scoring import target_nll

    from benchlib import demo_stream, reset_peak, status_mb

    stream = demo_stream()
    ctx = stream.ctx
    built = status_mb()
    encoded = ctx.encode(sorted(stream.tasks[0].train, key=lambda e: -len(e.text))[: args.micro_batch])
    reset_peak()
    start = time.perf_counter()
    if args.eval:
        example_nll(ctx.accelerator, ctx.scorer, encoded, ctx.tokenizer.pad_token_id, args.micro_batch)
        what = f"evaluation batch of {args.micro_batch}"
    else:
        batch = collate(encoded, list(range(len(encoded))), ctx.tokenizer.pad_token_id)
        ctx.scorer.train()
        inputs = batch.model_inputs()
        target_nll(ctx.scorer(**inputs), inputs["labels"]).mean().backward()
        what = (f"training micro-batch of {args.micro_batch} ({batch.n_targets} targets, "
                f"width {batch.input_ids.shape[1]})")
    peak = status_mb()["VmHWM"]
    print(f"{what}, longest utterances: model built {built['VmRSS']} MB (peak while loading {built['VmHWM']} MB); "
          f"peak during the batch {peak} MB (+{peak - built['VmRSS']} MB), {time.perf_counter() - start:.1f} s; "
          f"torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
