"""Issue 16's goal, checked from finished `cltune compare` folders: one row per (strategy, folder) pair.

The goal, on the hard stream: peak forgetting of every earlier task ≤ 3%, new-task perplexity ≤ 1.02× naive's,
training time ≤ 1.5× naive's, at most 10% of earlier training utterances stored; and on the demo stream no task's
final perplexity resolved worse than naive's. Each line prints the means with their 95% intervals (over seeds,
from compare.json) and says which part holds by the mean and which by the whole interval.

    .venv/bin/python bench/goal.py HARD_COMPARE_DIR[:STRATEGY] DEMO_COMPARE_DIR[:STRATEGY] [...]

Pairs are given hard first, then demo, for each candidate; STRATEGY defaults to every strategy but naive in the
folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(spec: str) -> tuple[Path, dict, list[str]]:
    folder, _, name = spec.partition(":")
    summary = json.loads((Path(folder) / "compare.json").read_text(encoding="utf-8"))
    names = [name] if name else [s for s in summary["strategies"] if s != summary["reference"]]
    return Path(folder), summary, names


def interval(cell: dict, digits: int = 1, scale: float = 1.0) -> str:
    return f"{cell['mean'] * scale:.{digits}f} [{cell['low'] * scale:.{digits}f}, {cell['high'] * scale:.{digits}f}]"


def hard_row(summary: dict, name: str) -> list[str]:
    entry, naive = summary["strategies"][name], summary["strategies"][summary["reference"]]
    peaks = entry["peak_forgetting_pct"]
    ratio = entry["new_task_ratio"]
    wall = entry["wall_s"]["mean"] / naive["wall_s"]["mean"]
    stored = entry["stored_utterances"]
    checks = {
        "peak forgetting ≤ 3%": (all(p["mean"] <= 3 for p in peaks), all(p["high"] <= 3 for p in peaks)),
        "new task ≤ 1.02×": (ratio["mean"] <= 1.02, ratio["high"] <= 1.02),
        "time ≤ 1.5×": (wall <= 1.5, wall <= 1.5),
    }
    verdict = "; ".join(f"{k}: {'yes' if by_mean and whole else 'by the mean' if by_mean else 'no'}"
                        for k, (by_mean, whole) in checks.items())
    return [f"peak forgetting % per earlier task: {', '.join(interval(p) for p in peaks)}",
            f"new-task ratio {interval(ratio, 3)}; wall {wall:.2f}× naive (means; forward passes "
            f"{entry['forward_vs_naive']['mean']:.2f}×); stored utterances {stored}",
            verdict]


def demo_row(summary: dict, name: str) -> list[str]:
    changes = summary["strategies"][name].get("vs_naive") or {}
    worse = [t for t, c in changes.items() if c["low_pct"] > 0]
    cells = ", ".join(f"{t} {c['change_pct']:+.1f}% [{c['low_pct']:+.1f}, {c['high_pct']:+.1f}]"
                      for t, c in changes.items())
    return [f"demo vs naive: {cells}", f"no worse than naive: {'no (' + ', '.join(worse) + ')' if worse else 'yes'}"]


def main() -> None:
    specs = sys.argv[1:]
    if not specs or len(specs) % 2:
        raise SystemExit(__doc__)
    for hard_spec, demo_spec in zip(specs[::2], specs[1::2]):
        hard_dir, hard, names = load(hard_spec)
        demo_dir, demo, _ = load(demo_spec)
        for name in names:
            print(f"== {name}  ({hard_dir} | {demo_dir})")
            for line in hard_row(hard, name) + (demo_row(demo, name) if name in demo["strategies"]
                                                else ["demo: not run"]):
                print("   " + line)


if __name__ == "__main__":
    main()
