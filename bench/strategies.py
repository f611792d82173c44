"""Strategy benchmark: every registered strategy, same budget and seed, on two streams.

- demo stream: host with guests A, B, C (chat after chat: a mild shift);
- hard stream: host with guest A, then paragraphs of the Python reference documentation that
  ships with every Python (`pydoc_data.topics`, one speaker "Python Docs"), then guest B.

Each run is a `cltune run` subprocess (so wall time and peak RSS are its own); the script writes
docs/benchmarks/strategies.md and one forgetting-vs-plasticity plot per stream.

    .venv/bin/python bench/strategies.py                      # the committed figures
    .venv/bin/python bench/strategies.py --strategies naive,ewc_replay --streams hard   # a subset
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cltune.data.demo import write_demo_corpus  # noqa: E402
from cltune.session import safe_name  # noqa: E402
from cltune.report.plots import tradeoff_scatter  # noqa: E402
from cltune.strategies import REGISTRY  # noqa: E402


def python_docs_csv(path: Path, rows: int, seed: int) -> Path:
    """A one-speaker dataset of paragraphs from the Python reference docs bundled with Python."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(block.split())
            if len(text) >= 80 and not text.startswith((">>>", "...")):
                paragraphs.append(text)
    chosen = random.Random(seed).sample(paragraphs, rows)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["speaker", "text"])
        writer.writerows(("Python Docs", p) for p in chosen)
    return path


def streams(data: Path, rows: int, seed: int) -> dict[str, list[dict]]:
    a, b, c = write_demo_corpus(data, sizes={"A": rows, "B": rows, "C": rows}, seed=seed)
    docs = python_docs_csv(data / "python_docs.csv", rows, seed)
    return {
        "demo": [{"name": "guest_a", "path": str(a)}, {"name": "guest_b", "path": str(b)}, {"name": "guest_c", "path": str(c)}],
        "hard": [{"name": "guest_a", "path": str(a)}, {"name": "python_docs", "path": str(docs)}, {"name": "guest_b", "path": str(b)}],
    }


def budget(args) -> dict:
    """The shared budget: every strategy trains with exactly these settings."""
    return {
        "seed": args.seed,
        "data": {"max_length": args.max_length},
        "train": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "micro_batch_size": 8,
                  "schedule": "constant", "warmup_ratio": 0.0},
        "eval": {"samples_per_speaker": 0},
        # Reptile's meta-training is capped so its cost stays comparable; the README documents the default cost.
        "reptile": {"meta_iterations": args.reptile_iterations},
    }


def entries(args) -> list[tuple[str, str, list[str]]]:
    """(label, strategy, --set overrides): every strategy at its defaults, then the --variant runs."""
    out = [(name, name, []) for name in args.strategies.split(",") if name]
    for variant in args.variant:
        strategy, *sets = variant.split(":")
        if strategy not in REGISTRY or not sets or not all("=" in x for x in sets):
            raise SystemExit(f"--variant {variant!r}: expected STRATEGY:KEY=VALUE[:KEY=VALUE…], e.g. ewc:ewc.lambda=1000")
        out.append((f"{strategy} ({', '.join(sets)})", strategy, sets))
    return out


def folder_name(stream: str, label: str) -> str:
    return safe_name(f"{stream}-{label}")


def run_one(label: str, name: str, sets: list[str], stream: str, tasks: list[dict], args, out: Path) -> dict:
    run_name = folder_name(stream, label)
    config = {"name": run_name, "output_dir": str(out / "runs"), "strategy": name, "tasks": tasks,
              "model": {"name": args.model}, **budget(args)}
    path = out / "configs" / f"{run_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # Idle OpenMP threads yield instead of spinning: on a shared CPU spinning costs up to 5x.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    overrides = [x for pair in sets for x in ("--set", pair)]
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "cltune", "run", str(path), "--overwrite", *overrides],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"strategy": label, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    (out / "runs" / run_name / "bench.json").write_text(json.dumps(
        {"wall_s": wall, "peak_rss_gb": rss_kb / 1e6, "load_avg": [load_before, os.getloadavg()[0]]}))
    return collect_one(label, stream, out)


def collect_one(name: str, stream: str, out: Path) -> dict:
    """A finished run's figures from its folder (metrics.json, and bench.json when this script ran it)."""
    folder = out / "runs" / folder_name(stream, name)
    if not (folder / "metrics.json").exists() or "forgetting_pct" not in json.loads((folder / "metrics.json").read_text()):
        return {"strategy": name, "error": "not run"}
    metrics = json.loads((folder / "metrics.json").read_text())
    extra = json.loads((folder / "bench.json").read_text()) if (folder / "bench.json").exists() else {}
    wall = extra.get("wall_s", sum(p["wall_s"] for p in metrics["phases"]))
    return {"strategy": name, "metrics": metrics, "wall_s": wall, "peak_rss_gb": extra.get("peak_rss_gb"),
            "load_avg": extra.get("load_avg")}


def peak_forgetting(ppl: list[list[float]]) -> list[float]:
    """Per earlier task, the worst rise (%) of its PPL at any later phase over its PPL right after learning it.

    `ppl` rows: before training, then after each phase; task t is learnt in phase t+1 (row t+1). Final-row
    forgetting hides a dip that a later, similar task repairs; this is the dip.
    """
    tasks = len(ppl[0])
    return [max(100 * (ppl[r][t] / ppl[t + 1][t] - 1) for r in range(t + 2, tasks + 1)) for t in range(tasks - 1)]


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def table(results: list[dict]) -> list[str]:
    ok = [r for r in results if "metrics" in r]
    naive = next((r for r in ok if r["strategy"] == "naive"), None)
    tasks = ok[0]["metrics"]["tasks"] if ok else []
    header = ["strategy", *(f"final PPL {t}" for t in tasks), *(f"forgetting {t}" for t in tasks[:-1]),
              *(f"peak forgetting {t}" for t in tasks[:-1]), "new-task PPL vs naive", "attribution (final, mean)", "wall s", "peak RSS GB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        if "metrics" not in r:
            lines.append(f"| {r['strategy']} | {r['error']} |")
            continue
        m = r["metrics"]
        rel = m["ppl"][-1][-1] / naive["metrics"]["ppl"][-1][-1] if naive else None
        cells = [r["strategy"], *(f"{v:.1f}" for v in m["ppl"][-1]), *(f"{f:+.1f}%" for f in m["forgetting_pct"]),
                 *(f"{f:+.1f}%" for f in peak_forgetting(m["ppl"])),
                 f"{rel:.3f}" if rel else "–", f"{100 * _mean(m['speaker_attribution'][-1]):.0f}%" if _mean(m["speaker_attribution"][-1]) is not None else "–",
                 f"{r['wall_s']:.0f}", f"{r['peak_rss_gb']:.2f}" if r["peak_rss_gb"] else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


NOTES = ("<!-- notes:start -->", "<!-- notes:end -->")


def kept_notes(doc: Path) -> list[str]:
    """The hand-written reading of the results in an existing doc (between the NOTES markers), kept on rewrite."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    if NOTES[0] not in text or NOTES[1] not in text:
        return [NOTES[0], NOTES[1], ""]
    return [text[text.index(NOTES[0]) : text.index(NOTES[1]) + len(NOTES[1])], ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=",".join(REGISTRY))
    parser.add_argument("--streams", default="hard,demo")
    parser.add_argument("--variant", action="append", default=[], metavar="STRATEGY:KEY=VALUE[:KEY=VALUE…]",
                        help="also run a strategy with changed settings, e.g. ewc:ewc.lambda=1000 (repeatable)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=150, help="utterances per dataset (80/10/10 split)")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--reptile-iterations", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "bench-strategies")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks" / "strategies.md")
    parser.add_argument("--collect", action="store_true", help="only rebuild the doc from finished runs in --out")
    args = parser.parse_args()

    runs = entries(args)
    all_streams = streams(args.out / "data", args.rows, args.seed)
    sections, total_wall, loads = [], 0.0, []
    for stream in args.streams.split(","):
        results = []
        for label, name, sets in runs:
            print(f"[{stream}] {label} …", flush=True)
            results.append(collect_one(label, stream, args.out) if args.collect
                           else run_one(label, name, sets, stream, all_streams[stream], args, args.out))
            r = results[-1]
            print("   ", r.get("error") or f"final {r['metrics']['ppl'][-1]} forgetting {r['metrics']['forgetting_pct']} ({r['wall_s']:.0f} s)", flush=True)
        ok = [r for r in results if "metrics" in r]
        total_wall += sum(r["wall_s"] for r in ok)
        loads += [x for r in ok for x in (r["load_avg"] or [])]
        if not ok:
            sections += [f"## {stream} stream", "", "Not run.", ""]
            continue
        plot = args.doc.parent / f"strategies_{stream}.png"
        tradeoff_scatter([{"label": r["strategy"], "forgetting": _mean(r["metrics"]["forgetting_pct"]),
                           "new_ppl": r["metrics"]["ppl"][-1][-1]} for r in ok], plot, f"{stream} stream",
                         xlabel="final forgetting, mean over earlier tasks (%)")
        tasks = " → ".join(t["name"] for t in all_streams[stream])
        sections += [f"## {stream} stream: {tasks}", ""]
        naive = next((r for r in ok if r["strategy"] == "naive"), None)
        if naive:
            m = naive["metrics"]
            sections += [f"`naive` on this stream: task 1 ({m['tasks'][0]}) PPL {m['ppl'][1][0]:.1f} right after learning it, "
                         f"worst {max(row[0] for row in m['ppl'][2:]):.1f} later (peak forgetting "
                         f"{peak_forgetting(m['ppl'])[0]:+.1f}%), {m['ppl'][-1][0]:.1f} at the end "
                         f"(final forgetting {m['forgetting_pct'][0]:+.1f}%).", ""]
        sections += [*table(results), "", f"![{stream}]({plot.name})", ""]
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    # The command that produced the figures: where files go, and rebuilding the doc, do not change them.
    budget_args = []
    for key, value in vars(args).items():
        if key in ("out", "doc", "collect") or value == parser.get_default(key):
            continue
        for v in value if isinstance(value, list) else [value]:
            budget_args.append(f"--{key.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{key.replace('_', '-')} {v}")
    command = "python bench/strategies.py " + " ".join(budget_args)
    head = [
        "# Strategy benchmark", "",
        f"Command: `{command.strip()}` · {datetime.date.today()} · {cpu or platform.processor()}, "
        f"{len(os.sched_getaffinity(0))} cores, CPU only · sum of run wall times {total_wall / 60:.0f} min · "
        + (f"1-minute load average {min(loads):.1f}–{max(loads):.1f} at the runs' starts and ends "
           "(above 2, other jobs shared the two cores and inflated those runs' times)." if loads else "load not recorded."), "",
        f"Budget (the same for every strategy, reduced to fit a laptop CPU): model `{args.model}`; {args.rows} utterances "
        f"per dataset (80/10/10 split, so {round(args.rows * 0.1)} test utterances per dataset — PPL differences under ~2% are noise); "
        f"{args.epochs:g} epochs per phase, constant LR {args.lr:g}, {args.batch_size} utterances per step, max length "
        f"{args.max_length} tokens; seed {args.seed}; strategy settings at their defaults except Reptile "
        f"(`meta_iterations: {args.reptile_iterations}`).", "",
        "Columns: the final row of the test-PPL matrix; forgetting % of each earlier task "
        "(100·(final − right after learning it)/right after learning it); the last task's final PPL relative to `naive` "
        "(plasticity, < 1 = better); peak forgetting: the worst rise at any later phase, which final-row forgetting "
        "hides when a later, similar task repairs the damage; speaker attribution after the last phase averaged over datasets with ≥ 2 speakers; "
        "wall time and peak RSS of the whole `cltune run` process.", "",
    ]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text("\n".join(head + kept_notes(args.doc) + sections), encoding="utf-8")
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
