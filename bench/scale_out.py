"""Runs per hour of `cltune compare`, one after another against `--ray`, on the same plan and machine.

Both sides run the same compare (the demo stream, a short budget, `--strategies` × `--seeds`) from an
empty folder: serially every run is a `cltune run` process with all the machine's threads; with
`--ray` (a local Ray started for the command) each run is a Ray task of `--run-cpus` CPUs, so several
run at once. Phase 1 is shared where the plan allows, on both sides alike. Writes the table, with the
machine and the command, to --doc (default docs/benchmarks/scale_out.md).

    .venv/bin/python bench/scale_out.py                       # naive,replay × 2 seeds, ~6 min on 2 cores
    .venv/bin/python bench/scale_out.py --seeds 3 --run-cpus 2
    # three datasets (the demo host with guests A, B, C), threads equal on both sides: the runs must be identical
    .venv/bin/python bench/scale_out.py --guests a,b,c --run-cpus 2 --doc -

Besides runs per hour it counts the runs whose metrics are identical on both sides (everything but wall
times, memory and the folder names), and the largest relative difference of a final perplexity.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BUDGET = ["train.max_steps=8", "eval.samples_per_speaker=0"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", default="replay")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--run-cpus", default="1")
    p.add_argument("--set", dest="sets", action="append", default=None, help=f"overrides (default: {BUDGET})")
    p.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "scale_out")
    p.add_argument("--guests", default="a,b", help="the demo host's guests, in order: the stream's datasets")
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks" / "scale_out.md"), help="page to write; -: none")
    args = p.parse_args(argv)
    from benchlib import DEMO_CONFIG, DEMO_DATA, describe_machine, ensure_demo_data, machine_line, table

    ensure_demo_data()
    machine = describe_machine()
    print(machine_line(machine), flush=True)
    config = args.out / "demo.yaml"
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    raw = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    raw["tasks"] = [{"name": f"guest_{g}", "path": str((DEMO_DATA / f"host_guest_{g}.csv").resolve())}
                    for g in args.guests.split(",")]
    config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    sets = [a for s in (args.sets or BUDGET) for a in ("--set", s)]
    rows, results = [], {}
    for side, extra in (("serial", []), ("ray", ["--ray", "--run-cpus", args.run_cpus])):
        command = [sys.executable, "-m", "cltune", "compare", str(config), "--strategies", args.strategies,
                   "--seeds", str(args.seeds), "--bootstrap", "200", "--out", str(args.out / side), *sets, *extra]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            return proc.returncode
        runs = len(list((args.out / side / "runs").glob("*/metrics.json")))
        summary = json.loads((args.out / side / "compare.json").read_text())
        final = {s: [round(v["mean"], 2) for v in e["final_ppl"]] for s, e in summary["strategies"].items()}
        results[side] = {"wall_s": wall, "runs": runs, "final_ppl": final,
                         "command": shlex.join(["cltune", *command[3:]])}
        print(f"{side}: {runs} runs in {wall:.0f} s", flush=True)
        rows.append([side, runs, f"{wall:.0f}", f"{runs / wall * 3600:.0f}", json.dumps(final)])
    speedup = results["serial"]["wall_s"] / results["ray"]["wall_s"]
    report = table(["side", "runs", "wall (s)", "runs/hour", "final PPL means (per strategy, per task)"], rows)
    print(report)
    print(f"--ray: {speedup:.2f}× the serial runs/hour")
    same, total, worst = identical_runs(args.out / "serial", args.out / "ray")
    print(f"identical runs: {same} of {total}; largest relative difference of a final PPL: {worst:.2e}")
    if args.doc == "-":
        return 0
    args.doc = Path(args.doc)
    args.doc.write_text("\n".join([
        "# Scale-out: `cltune compare` serially and with `--ray`", "",
        f"Measured by `bench/scale_out.py` on {machine_line(machine)}, {time.strftime('%Y-%m-%d %H:%M')}. Both sides "
        "ran the same plan from an empty folder: the demo stream with a short budget, `naive` and the strategies below "
        "over the seeds, phase 1 shared where the plan allows. Serially each run is a `cltune run` process with the "
        "machine's threads; with `--ray` each is a Ray task of `--run-cpus` CPUs on a Ray started for the command.", "",
        f"Serial: `{results['serial']['command']}`", "",
        f"Ray: `{results['ray']['command']}`", "",
        report, "",
        f"**`--ray` gave {speedup:.2f}× the serial runs per hour** on this machine. Where the sides run different "
        "thread counts (`--run-cpus` under Ray, every core serially) the final perplexities may differ: bf16 sums "
        "round differently with the number of threads, and training grows that; at equal threads they are the same "
        "(`tests/test_compare.py`).", ""]), encoding="utf-8")
    print(f"wrote {args.doc}")
    return 0


def _comparable(metrics: dict, folder: Path) -> dict:
    """A run's metrics.json without what differs between equal runs: wall times, memory, the folder's name."""
    out = {k: v for k, v in metrics.items() if k not in ("run", "peak_rss_mb", "stages_s")}
    out["phases"] = [{k: v for k, v in p.items() if k not in ("wall_s", "tokens_per_s")} for p in metrics["phases"]]
    for phase in out["phases"]:
        phase["strategy"] = {k: (str(Path(v).resolve().relative_to(folder.resolve())) if k == "phase1_from" else v)
                             for k, v in phase["strategy"].items() if k != "hooks_s" and not k.endswith("wall_s")}
    return out


def identical_runs(serial: Path, ray: Path) -> tuple[int, int, float]:
    """Runs whose metrics are the same on both sides, of all; the largest relative final-PPL difference."""
    same, total, worst = 0, 0, 0.0
    for path in sorted((serial / "runs").glob("*/metrics.json")):
        a = json.loads(path.read_text())
        b = json.loads((ray / "runs" / path.parent.name / "metrics.json").read_text())
        total += 1
        same += _comparable(a, serial) == _comparable(b, ray)
        worst = max([worst, *(abs(x / y - 1) for x, y in zip(a["ppl"][-1], b["ppl"][-1]))])
    return same, total, worst


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
