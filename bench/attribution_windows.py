"""Speaker attribution with whole windows (`context_turns: all`): each variant with another speaker token as a
branch of its window (`collate(branch=True)`, what evaluation does) against each variant on its own row after its
whole window (before commit 4d330eb), on a finished run's last checkpoint, interleaved; prints each task's seconds,
perplexity and attribution, which must agree.

    .venv/bin/python bench/attribution_windows.py RUN_DIR [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import cltune.evaluation.evaluate as evaluate
    from cltune.modeling import batching
    from cltune.modeling.checkpoint import load_checkpoint
    from cltune.modeling.scoring import TokenScorer
    from cltune.storage.verified import phase_folders
    from cltune.studies.runconfig import read_config
    from cltune.training.session import load_tasks, make_accelerator

    config = read_config(args.run / "config.resolved.yaml")
    last = phase_folders(args.run)[-1]
    model, tokenizer, _ = load_checkpoint(last)
    tasks = load_tasks(config)[1]
    accelerator, scorer = make_accelerator("fp32"), TokenScorer(model)

    def own_rows(*a, **k):
        return batching.collate(*a, **{**k, "branch": False})

    for _ in range(args.rounds):
        for label, collate in (("branches", batching.collate), ("own rows", own_rows)):
            evaluate.collate = collate
            for task in tasks:
                start = time.perf_counter()
                scores = evaluate.score_split(accelerator, scorer, tokenizer, task.test, list(task.tokens.values()),
                                              config.data.max_length, config.eval.batch_size)
                print(f"{label}: {task.name} {time.perf_counter() - start:.1f} s, PPL {scores.ppl:.4f}, "
                      f"attribution {scores.attribution:.4f}", flush=True)
    evaluate.collate = batching.collate


if __name__ == "__main__":
    main()
