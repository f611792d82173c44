"""What bounding a speaker's mixture costs (`max_candidates`), read from one finished run of a routed strategy.

The bound changes only how a speaker is scored (which columns join its likelihood mixture), not training, so one
run serves every bound: its last checkpoint scores each task's test utterances agnostically (by speaker token)
with every candidate (its own columns and every later one, as `later_adapters: true` routes it, whatever bound the
run was trained with) and with at most N (N = 1, 2, 3): its last own column and the newest others. Prints per task
the perplexity under each bound, its change against every candidate (paired on the same utterances, 95% bootstrap
over utterances: one seed), and the scoring time, measured side by side.

    .venv/bin/python bench/candidates.py RUN_DIR [--bounds 1,2,3]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run folder (its config.resolved.yaml and phase folders)")
    parser.add_argument("--bounds", default="1,2,3")
    args = parser.parse_args()

    from cltune.evaluation.evaluate import score_split
    from cltune.evaluation.stats import log_ppl, percentile_interval, resamples
    from cltune.modeling.checkpoint import load_checkpoint
    from cltune.modeling.scoring import TokenScorer, fp32_arithmetic
    from cltune.storage.verified import phase_folders
    from cltune.strategies.adapters import adapter_name, candidates
    from cltune.strategies.routing import load_router
    from cltune.studies.runconfig import read_config
    from cltune.training.session import load_tasks, make_accelerator

    config = read_config(args.run / "config.resolved.yaml")
    last = phase_folders(args.run)[-1]
    model, tokenizer, _ = load_checkpoint(last)
    router = load_router(last, model)
    tasks = load_tasks(config)[1]
    learned = int(last.name[5:])
    own = {}
    for task in tasks[:learned]:
        for token in task.tokens.values():
            own.setdefault(token, []).append(task.index)
    trained = dict(router.routes)
    accelerator, scorer = make_accelerator("fp32"), TokenScorer(model)
    print(f"{args.run}: {last.name}, {type(router).__name__}, routes {trained}")
    bounds = [None, *(int(b) for b in args.bounds.split(","))]
    print("| task | bound | candidates (host, guest) | test PPL | vs every candidate | scoring s |")
    print("|---|---|---|---|---|---|")
    for task in tasks:
        scores = {}
        for bound in bounds:
            router.routes = {t: [adapter_name(i) for i in candidates(own[t], range(learned), bound)]
                             for t in trained}
            start = time.perf_counter()
            with fp32_arithmetic(scorer):
                scores[bound] = score_split(accelerator, scorer, tokenizer, task.test, [], config.data.max_length,
                                            config.eval.batch_size, route=router.named_choices)
            seconds = time.perf_counter() - start
            sizes = ", ".join(str(len(router.routes.get(t, []))) for t in task.tokens.values())
            change = ""
            if bound:
                base, mine = scores[None], scores[bound]
                diff = log_ppl(mine.nll, mine.targets) - log_ppl(base.nll, base.targets)
                draws = [log_ppl(mine.nll, mine.targets, p) - log_ppl(base.nll, base.targets, p)
                         for p in resamples(len(base.nll), 1000, 0)]
                low, high = percentile_interval(draws)
                change = f"{math.expm1(diff):+.2%} [{math.expm1(low):+.2%}, {math.expm1(high):+.2%}]"
            print(f"| {task.name} | {bound or 'all'} | {sizes} | {scores[bound].ppl:.2f} | {change or '—'} | "
                  f"{seconds:.1f} |", flush=True)
        router.routes = trained


if __name__ == "__main__":
    main()
