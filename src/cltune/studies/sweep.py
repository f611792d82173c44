"""Grid sweeps (the reference pipeline's ablations): one run per grid point, sharing phase-1 checkpoints.

Points whose phase 1 would train identically (same model, LoRA, data, first task, seed and
phase-1 settings, and a strategy that trains phase 1 like `naive`) reuse the first such
point's phase-1 adapter instead of training it again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from cltune.config import BaseRunConfig
from cltune.errors import UserError
from cltune.evaluation.results import RunMetrics
from cltune.storage.files import atomic_write_text, writable_folder
from cltune.strategies import REGISTRY
from cltune.studies.runconfig import read_config

if TYPE_CHECKING:
    from cltune.studies.scale_out import RayOptions


def expand_grid(grid: list[str]) -> list[dict[str, str]]:
    """`["a=1,2", "b=x,y"]` → the 4 combinations as {key: value} dicts, first key slowest."""
    axes = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UserError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. --grid ewc.lambda=0,10,20")
        axes.append([(key.strip(), v.strip()) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def phase1_fingerprint(config: BaseRunConfig) -> str:
    """A hash of everything that decides how phase 1 trains."""
    parts = {
        "model": config.model.model_dump(mode="json"),
        "lora": config.lora.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json"),
        "tasks": [t.model_dump(mode="json") for t in config.tasks],  # all tasks: they fix the speaker tokens
        "seed": config.seed,
        "phase1": config.phase(0).model_dump(mode="json"),
        "strategy": None if REGISTRY[config.strategy].phase1_neutral else config.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _row(point: dict, metrics: RunMetrics, reused: bool) -> dict:
    ppl = metrics.ppl
    return {
        **point,
        "phase1_task1_ppl": round(ppl[1][0], 3),
        "final_task1_ppl": round(ppl[-1][0], 3),
        "forgetting_pct": round(metrics.forgetting_pct[0], 3) if metrics.forgetting_pct else None,
        "new_task_ppl": round(ppl[-1][-1], 3),
        "avg_final_ppl": round(metrics.avg_final_ppl, 3),
        "wall_s": round(sum(p.wall_s for p in metrics.phases), 1),
        "reused_phase1": reused,
    }


def _markdown(rows: list[dict], command: str) -> str:
    header = list(rows[0])
    lines = ["# Sweep", "", f"`{command}`", "",
             "phase1_task1_ppl: task-1 test PPL after phase 1; final_task1_ppl: after the last phase; "
             "new_task_ppl: the last task's test PPL at the end (plasticity).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines + ["", "![forgetting vs plasticity](sweep.png)", ""])


def run_sweep(config_path: Path, grid: list[str], sets: list[str], out: Path | None, console=None,
              ray: RayOptions | None = None) -> Path:
    """Run every grid point (one after another in this process, or with `ray` as Ray tasks: see
    `cltune.studies.scale_out`) and write sweep.md/.csv/.png; returns sweep.md."""
    from cltune.report.plots import tradeoff_scatter
    from cltune.studies.pipeline import run_stream
    from cltune.studies.scale_out import Job, execute_on_ray

    points = expand_grid(grid)
    base = read_config(config_path, sets)
    out = out or base.output_dir / f"{base.name}-sweep"
    writable_folder(out, "sweep")
    phase1_dirs: dict[str, Path] = {}
    jobs = []
    for i, point in enumerate(points):
        name = f"point{i:02d}"
        overrides = [*sets, *(f"{k}={v}" for k, v in point.items())]
        config = read_config(config_path, overrides, fixed={"name": name, "output_dir": str(out)})
        fingerprint = phase1_fingerprint(config)
        jobs.append(Job(f"{name} {point}", config, phase1_dirs.get(fingerprint)))
        phase1_dirs.setdefault(fingerprint, config.run_dir / "phase1")
    if ray is not None:
        results = execute_on_ray(jobs, out, ray, console)
    else:
        results = []
        for point, job in zip(points, jobs):
            if console:
                console.print(f"[bold]{job.config.name}[/] {point}"
                              + (f" (phase 1 from {job.phase1_from})" if job.phase1_from else ""))
            results.append(run_stream(job.config, reuse_phase1=job.phase1_from, console=console))
    rows = [_row(point, metrics, job.phase1_from is not None) for point, job, metrics in zip(points, jobs, results)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "sweep.csv", buffer.getvalue())
    command = shlex.join(["cltune", "sweep", str(config_path), *(a for g in grid for a in ("--grid", g)),
                          *(a for s in sets for a in ("--set", s))])
    atomic_write_text(out / "sweep.md", _markdown(rows, command))
    labels = [", ".join(f"{k}={v}" for k, v in p.items()) for p in points]
    tradeoff_scatter([{"label": lab, "forgetting": r["forgetting_pct"] or 0.0, "new_ppl": r["new_task_ppl"]}
                      for lab, r in zip(labels, rows)], out / "sweep.png", "sweep: forgetting vs plasticity")
    return out / "sweep.md"
