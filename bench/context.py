"""Context-turns benchmark: the demo stream with `data.context_turns` 0 and 2 (and any other settings
given as variants), several seeds, paired utterance by utterance.

Each run is `cltune run` on src/cltune/configs/demo.yaml with the variant's `--set` overrides (resumable: a run
whose metrics.json is complete is reused). The test split is by conversation and the target tokens
of an utterance do not depend on its context, so every variant scores the same utterances and
targets: the perplexity differences are paired exactly (bootstrap over seeds and test utterances).
Writes OUT/context.json and, with --doc, the tables of docs/benchmarks/context.md (the reading
between the notes markers is kept).

    .venv/bin/python bench/context.py --out /work/bench-context --doc docs/benchmarks/context.md
    .venv/bin/python bench/context.py --variant "k2-token-lr=data.context_turns=2,train.token_lr=null"
    .venv/bin/python bench/context.py --guests d,e --out /tmp/bench-context-de   # the host with guests D and E
    .venv/bin/python bench/context.py --only-variants --variant before= --variant after= --reference before \\
        --source before=/tmp/wt-before --source after=/tmp/wt-after   # two commits, as git worktrees
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from cltune.data.demo import write_demo_corpus  # noqa: E402
from cltune.evaluation.stats import hierarchical_draws, mean_interval, percentile_interval, pooled_paired_differences  # noqa: E402

from benchlib import DEMO_CONFIG, describe_machine, machine_line  # noqa: E402

NOTES = ("<!-- notes:start -->", "<!-- notes:end -->")
VARIANTS = {"k0": ["data.context_turns=0"], "k2": ["data.context_turns=2"]}


def run_one(out: Path, config: Path, variant: str, sets: list[str], seed: int, source: Path | None = None) -> Path:
    """One run of the demo config (skipped when its metrics.json is complete); returns its folder. `source`: a
    checkout whose src/ runs it instead of this one (a before/after comparison of two commits)."""
    run_dir = out / "runs" / f"{variant}-s{seed}"
    metrics = run_dir / "metrics.json"
    if metrics.exists() and len(json.loads(metrics.read_text())["ppl"]) == 3:
        return run_dir
    command = [sys.executable, "-m", "cltune", "run", str(config), "--overwrite", "--set", f"seed={seed}",
               "--set", f"name={run_dir.name}", "--set", f"output_dir={run_dir.parent}"]
    for item in sets:
        command += ["--set", item]
    print(" ".join(command[3:]), f"({source})" if source else "", flush=True)
    env = None if source is None else {**os.environ, "PYTHONPATH": str(source / "src")}
    subprocess.run(command, check=True, env=env)
    return run_dir


def geometric_interval(values: list[float]) -> tuple[float, float | None, float | None]:
    """Geometric mean and 95% t-interval of positive figures (PPLs), computed on their logarithms."""
    mean, low, high = mean_interval([math.log(v) for v in values])
    return math.exp(mean), None if low is None else math.exp(low), None if high is None else math.exp(high)


def share_interval(values: list[float | None]) -> tuple[float | None, float | None, float | None]:
    """Mean and 95% t-interval of shares, the interval clipped to [0, 1]; all None (attribution off): None."""
    if any(v is None for v in values):
        return None, None, None
    mean, low, high = mean_interval(values)
    return mean, None if low is None else max(0.0, low), None if high is None else min(1.0, high)


def summarize(out: Path, runs: dict[str, list[Path]], reference: str) -> dict:
    tasks = json.loads((runs[reference][0] / "metrics.json").read_text())["tasks"]
    summary: dict = {"tasks": tasks, "reference": reference, "variants": {}}
    for variant, folders in runs.items():
        metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
        nll = [json.loads((f / "test_nll.json").read_text())["single"] for f in folders]
        train = [[p["tokens_per_s"] for p in m["phases"]] for m in metrics]
        row = {
            "seeds": len(folders),
            "final_ppl": [geometric_interval([m["ppl"][-1][j] for m in metrics]) for j in range(len(tasks))],
            "learned_ppl": [geometric_interval([m["ppl"][j + 1][j] for m in metrics]) for j in range(len(tasks))],
            "attribution": [share_interval([m["speaker_attribution"][j + 1][j] for m in metrics])
                            for j in range(len(tasks))],
            "final_attribution": [share_interval([m["speaker_attribution"][-1][j] for m in metrics])
                                  for j in range(len(tasks))],
            "target_tokens_per_s": [mean_interval([t[j] for t in train]) for j in range(len(tasks))],
            "wall_s": mean_interval([sum(p["wall_s"] for p in m["phases"]) for m in metrics]),
            # the training loops alone (no validation, checkpoints or strategy hooks), where metrics.json has it
            "train_s": mean_interval([m["stages_s"]["train"] for m in metrics])
            if all((m.get("stages_s") or {}).get("train") for m in metrics) else (None, None, None),
            "training_forward_tokens": mean_interval([sum(p["strategy"]["training_forward_tokens"] for p in m["phases"])
                                                      for m in metrics]),
            "test_utterances": [len(nll[0][t]["nll"]) for t in tasks],
        }
        if variant != reference:
            base = [json.loads((f / "test_nll.json").read_text())["single"] for f in runs[reference]]
            row["vs_reference_pct"] = []
            for task in tasks:
                pairs = []
                for mine, theirs in zip(nll, base):
                    assert (mine[task]["lines"] == theirs[task]["lines"]
                            and mine[task]["targets"] == theirs[task]["targets"])
                    pairs.append(((mine[task]["nll"], mine[task]["targets"]),
                                  (theirs[task]["nll"], theirs[task]["targets"])))
                draws = hierarchical_draws([len(p[0][0]) for p in pairs], 1000, seed=0)
                point, values = pooled_paired_differences(pairs, draws)
                low, high = percentile_interval(values)
                row["vs_reference_pct"].append([100 * math.expm1(v) for v in (point, low, high)])
        summary["variants"][variant] = row
    return summary


def cell(values, digits: int = 1, scale: float = 1.0) -> str:
    mean, low, high = values
    if mean is None:
        return "—"
    if low is None:
        return f"{scale * mean:.{digits}f}"
    return f"{scale * mean:.{digits}f} [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


def _share(values) -> str:
    return "—" if values[0] is None else cell(values, 1, 100) + "%"


def tables(summary: dict, sets: dict[str, list[str]]) -> list[str]:
    tasks, ref = summary["tasks"], summary["reference"]
    reference_positions = summary["variants"][ref]["training_forward_tokens"][0]
    lines = ["| variant | settings | " + " | ".join(f"{t} final PPL" for t in tasks) + " | "
             + " | ".join(f"{t} vs {ref}" for t in tasks) + " |",
             "|---|---|" + "---|" * (2 * len(tasks))]
    for name, row in summary["variants"].items():
        diffs = row.get("vs_reference_pct") or [None] * len(tasks)
        lines.append(f"| {name} | `{' '.join(sets[name])}` | " + " | ".join(cell(v) for v in row["final_ppl"]) + " | "
                     + " | ".join("—" if d is None else f"{d[0]:+.1f}% [{d[1]:+.1f}, {d[2]:+.1f}]"
                                  for d in diffs) + " |")
    lines += ["", "| variant | " + " | ".join(f"{t} attribution after learning it" for t in tasks) + " | "
              + " | ".join(f"{t} attribution at the end" for t in tasks) + " | "
              + " | ".join(f"phase {j + 1} target tokens/s" for j in range(len(tasks))) + " | phases s | train s | "
              f"train s vs {ref} | training positions vs {ref} |",
              "|---|" + "---|" * (3 * len(tasks) + 4)]
    reference_train = summary["variants"][ref]["train_s"][0]
    for name, row in summary["variants"].items():
        lines.append(f"| {name} | " + " | ".join(_share(v) for v in row["attribution"]) + " | "
                     + " | ".join(_share(v) for v in row["final_attribution"]) + " | "
                     + " | ".join(cell(v, 0) for v in row["target_tokens_per_s"]) + f" | {cell(row['wall_s'], 0)} | "
                     f"{cell(row['train_s'], 0)} | "
                     + (f"{row['train_s'][0] / reference_train:.2f}×" if row["train_s"][0] and reference_train else "—")
                     + f" | {row['training_forward_tokens'][0] / reference_positions:.2f}× |")
    sizes = next(iter(summary["variants"].values()))["test_utterances"]
    lines += ["", f"Test utterances per seed: {', '.join(f'{t} {n}' for t, n in zip(tasks, sizes))} (split by "
              "conversation, so each seed has its own test set; every variant of a seed scores the same one)."]
    return lines


def write_doc(doc: Path, summary: dict, sets: dict[str, list[str]], machine: str, seeds: int) -> None:
    kept = []
    if doc.exists():
        text = doc.read_text(encoding="utf-8")
        if NOTES[0] in text and NOTES[1] in text:
            kept = text[text.index(NOTES[0]) + len(NOTES[0]) : text.index(NOTES[1])].strip("\n").splitlines()
    lines = ["# Context turns on the demo stream", "",
             f"`bench/context.py`: `cltune run` on the shipped demo config (ewc_replay, λ 10, 10% replay, "
             f"token_lr 1e-2) with "
             f"each variant's settings, {seeds} seeds (each reseeds split, sampling and initialization). Final PPL: "
             "geometric mean over seeds with a 95% t-interval on log PPL. \"vs\" columns: the change in final test "
             "PPL against "
             f"`{summary['reference']}` on the same test utterances and target tokens, pooled over seeds, 95% "
             "bootstrap over seeds and utterances. Attribution: share of test utterances whose text is most "
             "likely after their own speaker token (same context for every candidate), mean over seeds with a "
             "t-interval clipped to 0–100%. Target tokens/s: training throughput counting target tokens only "
             "(context positions "
             "cost compute but are not counted); training positions: token positions through the model in the "
             "training loops (forward), against the reference, a cost free of machine load.", "",
             f"Machine: {machine}.", "", *tables(summary, sets), "",
             NOTES[0], *kept, NOTES[1], ""]
    doc.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-context"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=KEY=VALUE,KEY=VALUE: another variant (its --set overrides)")
    parser.add_argument("--source", action="append", default=[],
                        help="NAME=PATH: run variant NAME with the code of the checkout at PATH (a git worktree)")
    parser.add_argument("--only-variants", action="store_true", help="run the --variant ones only, not k0 and k2")
    parser.add_argument("--reference", default="k0")
    parser.add_argument("--doc", type=Path, help="write the tables into this Markdown file")
    parser.add_argument("--guests", help="another stream: the demo host with these guests in order (letters, e.g. "
                                         "d,e: `cltune demo-data --guests` names them), in place of guests A and B")
    args = parser.parse_args()
    sets = {} if args.only_variants else dict(VARIANTS)
    for spec in args.variant:
        name, _, items = spec.partition("=")
        sets[name] = [item for item in items.split(",") if item]
    sources = {name: Path(path).resolve() for name, _, path in (spec.partition("=") for spec in args.source)}
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    letters = [x.strip().lower() for x in args.guests.split(",")] if args.guests else []
    write_demo_corpus(data, guests=max([3] + [ord(x) - ord("a") + 1 for x in letters]))
    raw = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    if letters:
        raw["tasks"] = [{"name": f"guest_{x}", "path": f"host_guest_{x}.csv"} for x in letters]
    for task in raw["tasks"]:
        task["path"] = str(data / Path(task["path"]).name)
    config = args.out / "demo.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    machine = describe_machine()
    runs = {name: [run_one(args.out, config, name, items, seed, sources.get(name)) for seed in range(args.seeds)]
            for name, items in sets.items()}
    summary = summarize(args.out, runs, args.reference)
    summary["machine"] = machine
    (args.out / "context.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if args.doc:
        write_doc(args.doc, summary, sets, machine_line(machine), args.seeds)
        print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
