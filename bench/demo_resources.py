"""Peak memory and wall time of the demo pipeline, measured on a child process.

Runs `cltune demo` (what `make demo` runs: the shipped demo config after writing the demo
CSVs) into a temporary output folder, and reads the child's peak resident set size from
`resource.getrusage(RUSAGE_CHILDREN)` and its wall time from the clock. The run's own
metrics.json then splits the wall time into training (per phase, with tokens/s) and the rest
(model load, evaluation, Fisher, samples, reports). Targets: RSS ≤ 3 GB, wall ≤ 4 min.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/demo_resources.py --json docs/benchmarks/demo_resources.json
    .venv/bin/python bench/demo_resources.py --set train.max_steps=2        # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RSS_TARGET_GB, WALL_TARGET_S = 3.0, 240.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="a run config for `cltune run` (default: `cltune demo` itself)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra `cltune run --set` overrides")
    p.add_argument("--timeout", type=float, default=1200, help="seconds before the child is stopped")
    p.add_argument("--keep", default=None, help="keep the run folder here instead of a deleted temporary one")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchlib import DEMO_DATA, ROOT, describe_machine, load1, machine_line, table, write_json

    machine = describe_machine()
    print(machine_line(machine), flush=True)
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cltune-demo-"))
    cltune = Path(sys.executable).with_name("cltune")
    sets = [a for s in args.sets for a in ("--set", s)]
    if args.config:
        command = [str(cltune), "run", args.config, "--set", f"output_dir='{out}'", *sets, "--overwrite"]
    else:  # what `make demo` runs: the shipped demo config (writing the demo CSVs takes a second)
        command = [str(cltune), "demo", "--out", str(out), "--data", str(DEMO_DATA), *sets]
    print("running:", " ".join(command), flush=True)
    loads, start = [load1()], time.perf_counter()
    try:
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        reader = threading.Thread(target=lambda: tail.extend(line.rstrip() for line in child.stdout), daemon=True)
        reader.start()
        while child.poll() is None:  # sample the load while the run goes; stop it past the timeout
            time.sleep(5)
            loads.append(load1())
            if time.perf_counter() - start > args.timeout:
                child.kill()
        reader.join(timeout=10)
        code = child.wait()
        wall = time.perf_counter() - start
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
        metrics_path = out / "demo" / "metrics.json"
        if not metrics_path.exists():
            metrics_path = next(out.glob("*/metrics.json"), metrics_path)
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    phases = metrics.get("phases", [])
    train_s = sum(p["wall_s"] for p in phases)
    rss_gb = peak_kb / 1024**2
    rows = [["peak RSS", f"{rss_gb:.2f} GB", f"≤ {RSS_TARGET_GB:.0f} GB",
             "met" if rss_gb <= RSS_TARGET_GB else "NOT met"],
            ["wall time", f"{wall:.0f} s ({wall / 60:.1f} min)", f"≤ {WALL_TARGET_S / 60:.0f} min",
             "met" if wall <= WALL_TARGET_S else "NOT met"]]
    for p in phases:
        rows.append([f"phase {p['phase']} training ({p['task']})", f"{p['wall_s']:.0f} s",
                     f"{p['target_tokens']} tokens, {p['tokens_per_s']:.1f} tok/s, {p['steps']} steps", ""])
    rows.append(["everything else (load, eval, Fisher, samples, report)", f"{wall - train_s:.0f} s", "", ""])
    print("\n".join(tail[-8:]))
    print()
    print(table(["what", "measured", "target", ""], rows))
    print(f"exit code {code}; load avg (1 min) during the run: min {min(loads)}, "
          f"median {sorted(loads)[len(loads) // 2]}, max {max(loads)}")
    write_json(args.json, {"command": " ".join([Path(sys.executable).name, *sys.argv]), "child": command,
                           "machine": machine, "exit_code": code, "wall_s": wall, "peak_rss_gb": rss_gb,
                           "load1": {"min": min(loads), "median": sorted(loads)[len(loads) // 2], "max": max(loads)},
                           "phases": phases, "tail": tail[-30:]})
    return code


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
