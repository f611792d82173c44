"""Two sets of runs of one stream, paired seed by seed on the same test utterances: final PPL change per task.

`cltune compare` pairs each strategy with naive's run of the same seed. This pairs any two runs folders, so naive
can be read against naive run again (the same config and seed, another process): what the compare's intervals do
hold only through the seeds' spread — training noise, run to run — shows. For every task, the mean over seeds of
the paired ln-PPL difference as a per cent change of PPL, with the compare's 95% interval (`paired_change`: the
wider of a t-interval over the seeds and a two-level bootstrap over seeds and utterances).

    .venv/bin/python bench/paired_runs.py A_RUNS B_RUNS [--strategy naive] [--against naive] [--row single]
        [--against-row single]

A_RUNS/{strategy}-seed{N} against B_RUNS/{against}-seed{N} for every seed both hold; `--row`: A's final row,
`single` for one model (naive) or `agnostic` (routed by speaker token) or `oracle` (by task id); `--against-row`:
B's (default `single`; a routed strategy against itself with another setting: `agnostic` on both).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def seeds_in(runs: Path, strategy: str) -> set[int]:
    return {int(p.name.rsplit("seed", 1)[1]) for p in runs.glob(f"{strategy}-seed*") if (p / "test_nll.json").exists()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--strategy", default="naive")
    parser.add_argument("--against", default="naive")
    parser.add_argument("--row", default="single", choices=("single", "agnostic", "oracle"))
    parser.add_argument("--against-row", default="single", choices=("single", "agnostic", "oracle"))
    parser.add_argument("--draws", type=int, default=1000)
    args = parser.parse_args()

    from cltune.studies.compare import paired_change

    seeds = sorted(seeds_in(args.a, args.strategy) & seeds_in(args.b, args.against))
    if not seeds:
        raise SystemExit(f"no seed with a finished run in both {args.a} and {args.b}")
    a = [args.a / f"{args.strategy}-seed{s}" for s in seeds]
    b = [args.b / f"{args.against}-seed{s}" for s in seeds]
    tasks = json.loads((a[0] / "metrics.json").read_text(encoding="utf-8"))["tasks"]
    print(f"{a[0].parent}/{args.strategy} ({args.row}) against {b[0].parent}/{args.against} ({args.against_row}), "
          f"seeds {seeds}")
    for task in tasks:
        change = paired_change(a, b, task, args.row, args.draws, args.against_row)
        mark = "  resolved" if change["resolved"] else ""
        print(f"{task:<12} {change['change_pct']:+6.1f}% [{change['low_pct']:+.1f}, {change['high_pct']:+.1f}]{mark}")


if __name__ == "__main__":
    main()
