"""Each speaker's final perplexity against naive's, read from a finished `cltune compare` folder.

The compare's tables are per task (a file: its guest and the host together). This splits the final matrix row
by speaker: the host's utterances of every task pooled, each guest's own, so "the host no worse than naive" can be
read. For every seed, the strategy's final row (routed by speaker token where the run has that row, as the
compare's headline does) and naive's are paired on the same test utterances (RUN/test_nll.json); the figure is the
mean over seeds of the difference in ln PPL, as a per cent change of PPL, with the compare's 95% interval: the
wider of a t-interval over the seeds (the runs' training noise) and a bootstrap over seeds, then each seed's
utterances (test-set noise).

    .venv/bin/python bench/speakers.py COMPARE_DIR [--strategy progressive] [--draws 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def final_row(run: Path) -> dict:
    """Per task: the final row's lines, summed NLLs and targets (the speaker-routed row when the run has one)."""
    saved = json.loads((run / "test_nll.json").read_text(encoding="utf-8"))
    return saved.get("agnostic") or saved.get("single") or saved["oracle"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compare", type=Path, help="a finished `cltune compare` folder")
    parser.add_argument("--strategy", default="progressive")
    parser.add_argument("--draws", type=int, default=1000)
    args = parser.parse_args()

    from cltune.evaluation.stats import paired_interval
    from cltune.studies.runconfig import read_config
    from cltune.training.session import load_tasks

    runs = args.compare / "runs"
    seeds = sorted(int(p.name.rsplit("seed", 1)[1]) for p in runs.glob(f"{args.strategy}-seed*"))
    by_speaker: dict[str, list] = {}  # speaker → per seed ((nll, targets) strategy, (nll, targets) naive)
    for seed in seeds:
        ours, naive = final_row(runs / f"{args.strategy}-seed{seed}"), final_row(runs / f"naive-seed{seed}")
        tasks = load_tasks(read_config(runs / f"naive-seed{seed}" / "config.resolved.yaml"))[1]
        pooled: dict[str, tuple[list, list, list, list]] = {}
        for task in tasks:
            a, b = ours[task.name], naive[task.name]
            assert a["lines"] == b["lines"] == [e.line for e in task.test], f"{task.name}: other test utterances"
            for i, example in enumerate(task.test):
                cells = pooled.setdefault(example.speaker, ([], [], [], []))
                for column, value in zip(cells, (a["nll"][i], a["targets"][i], b["nll"][i], b["targets"][i])):
                    column.append(value)
        for speaker, (nll, targets, naive_nll, naive_targets) in pooled.items():
            by_speaker.setdefault(speaker, []).append(((nll, targets), (naive_nll, naive_targets)))

    print(f"{args.compare}: {args.strategy} against naive, final test PPL by speaker, seeds {seeds}")
    print(f"{'speaker':<12} {'utterances':>11} {'PPL':>8} {'naive':>8}  change [95% interval]")
    for speaker, pairs in sorted(by_speaker.items(), key=lambda item: -len(item[1][0][0][0])):
        if len(pairs) != len(seeds):
            continue
        point, low, high = paired_interval(pairs, args.draws)
        ppl = math.exp(sum(sum(a[0]) / sum(a[1]) for a, _ in pairs) / len(pairs))
        reference = math.exp(sum(sum(b[0]) / sum(b[1]) for _, b in pairs) / len(pairs))
        change = lambda v: f"{100 * (math.exp(v) - 1):+.1f}%"  # noqa: E731
        print(f"{speaker:<12} {sum(len(a[0]) for a, _ in pairs):>11} {ppl:>8.2f} {reference:>8.2f}  "
              f"{change(point)} [{change(low)}, {change(high)}]")


if __name__ == "__main__":
    main()
