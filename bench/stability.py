"""Did every run of a `cltune compare` folder train stably? Read from the runs' files alone.

For each run and phase: the steps, the phase task's validation perplexity before and after its phase (training on
a task lowers it; a phase is flagged when it ends more than 10% above its start, or exactly where it started: its
weights came back whole), whether every logged training loss is finite, and how many times the loss guard backed
off: the phase record's `loss_guard_backoffs`, or for runs written before it, read from the logged rate (a back-off
halves every learning rate for the rest of the phase: the guard acted where the rate falls below 0.75× what the
phase's schedule — `train.schedule`, `train.warmup_ratio`, `train.lr` of the run's config — gives at that step; a
back-off at a phase's last step leaves no trace there, only the unchanged perplexity). A run that diverged for good
has no complete metrics.json (`cltune run` stopped with the step and the setting to change).

    .venv/bin/python bench/stability.py COMPARE_DIR
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def scheduled(step: int, steps: int, warmup: int, schedule: str) -> float:
    """The share of the peak rate at optimizer step `step` (1-based, as logged: after the scheduler stepped)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return max(0.0, 1 - progress) if schedule == "linear" else max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    from cltune.storage.verified import phase_folders
    from cltune.studies.runconfig import read_config

    runs = Path(sys.argv[1]) / "runs"
    print(f"{'run':<26} phase steps  validation PPL before → after  finite  back-offs")
    unstable = 0
    for run in sorted(p for p in runs.iterdir() if p.is_dir()):
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
        if len(metrics.get("phases", [])) < len(metrics.get("tasks", [None])):
            print(f"{run.name:<26} the run did not finish")
            unstable += 1
            continue
        config = read_config(run / "config.resolved.yaml")
        for record, folder in zip(metrics["phases"], phase_folders(run)):
            phase = record["phase"]
            rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line]
            steps = [r for r in rows if "loss" in r and r.get("phase") == phase]
            settings = config.phase(phase - 1)
            total = len(steps)
            warmup = round(settings.warmup_ratio * total)
            expected = [0.75 * settings.lr * scheduled(r["step"], total, warmup, settings.schedule) for r in steps]
            low = [r["lr"] < bound for r, bound in zip(steps, expected)]
            backoffs = record.get("loss_guard_backoffs",  # else a halving the schedule does not make
                                  sum(b and not a for a, b in zip([False, *low], low)))
            finite = all(math.isfinite(r["loss"]) for r in steps)
            before, after = record["before"]["val_ppl"], record["after"]["val_ppl"]
            moved = after != before or not total
            flag = "" if finite and after <= 1.1 * before and moved and not backoffs else "  <- look"
            unstable += bool(flag)
            print(f"{run.name:<26} {phase:>5} {total:>5}  {before:>12.2f} → {after:<12.2f}  {finite!s:>6}  "
                  f"{backoffs:>9}{flag}")
    print(f"{unstable} phase(s) or run(s) to look at")


if __name__ == "__main__":
    main()
