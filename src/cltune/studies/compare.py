"""`cltune compare`: which strategy keeps *this* stream's earlier styles, at what cost, with intervals.

Every (strategy, seed) is one `cltune run` in its own process (so each run's peak memory is its
own), on the same stream and budget; `naive` always runs, as the reference. A strategy whose
phase 1 trains exactly like naive's (same seed and phase-1 settings) takes naive's phase-1
checkpoint instead of training it again. Finished runs are reused, interrupted ones resumed.
Each seed reseeds the split, the sampling and the initialization.

Figures per strategy: the mean and 95% t-interval over seeds of each task's final perplexity,
final and peak forgetting, BWT/FWT, the new task's perplexity relative to naive (paired by seed)
and attribution; a cost ledger; and, per task, the perplexity change against naive paired on the same
test utterances (same seed), averaged over seeds, with an interval that holds both the runs' training
noise (a t-interval over the seeds) and test-set noise (a two-level bootstrap). Strategies
whose matrix needs a task id (per-task adapters) are compared on their agnostic matrix — routed
by speaker token, what every other strategy and a user get — and labelled so.
"""

from __future__ import annotations

import math
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from cltune.config import BaseRunConfig, dump_config
from cltune.errors import UserError
from cltune.evaluation.results import RunMetrics
from cltune.evaluation.stats import mean_interval, paired_interval
from cltune.storage.files import atomic_write_text, read_json, writable_folder
from cltune.strategies import REGISTRY
from cltune.studies.pipeline import TEST_NLL
from cltune.studies.runconfig import make_config, read_config
from cltune.studies.sweep import phase1_fingerprint
from cltune.training import rundir

if TYPE_CHECKING:
    from cltune.studies.scale_out import RayOptions

REFERENCE = "naive"


@dataclass
class Planned:
    strategy: str
    seed: int
    config: BaseRunConfig
    phase1_from: Path | None = None  # naive's phase-1 checkpoint, when this strategy's phase 1 equals it

    @property
    def label(self) -> str:
        return f"{self.strategy}, seed {self.seed}"


def plan_runs(config_path: Path, strategies: list[str], seeds: int, sets: list[str], out: Path) -> list[Planned]:
    """Every (strategy, seed) run, naive first within each seed; phase 1 shared where it trains alike."""
    base_seed = read_config(config_path, sets).seed  # first: it imports the plugins the config names
    unknown = [s for s in strategies if s not in REGISTRY]
    if unknown:
        raise UserError(f"--strategies: unknown {', '.join(unknown)}; choose from {', '.join(REGISTRY)}")
    if seeds < 1:
        raise UserError("--seeds: at least 1 (3 or more for intervals worth reading)")
    names = [REFERENCE] + [s for s in dict.fromkeys(strategies) if s != REFERENCE]
    planned, phase1 = [], {}
    for seed in range(base_seed, base_seed + seeds):
        for name in names:
            config = read_config(config_path, sets, fixed={"strategy": name, "seed": seed, "name": f"{name}-seed{seed}",
                                                           "output_dir": str(out / "runs")})
            key = phase1_fingerprint(config)
            planned.append(Planned(name, seed, config, phase1.get(key)))
            phase1.setdefault(key, config.run_dir / "phase1")
    return planned


def _differs(saved: Path, config: BaseRunConfig) -> bool:
    """Whether the saved resolved config describes another run than `config`. The saved one is read through
    today's config model first, so a setting cltune added since (with its default) is no difference; other
    strategies' settings do not change this run, so a strategy added to cltune, or another one's setting
    changed, leaves finished runs reusable."""
    text = saved.read_text(encoding="utf-8")
    try:
        text = dump_config(make_config(yaml.safe_load(text) or {}))
    except (UserError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        pass  # compared as written: a removed or renamed setting is a difference
    unread = set(REGISTRY.sections()) - set(REGISTRY[config.strategy].sections)
    try:
        return rundir.text_difference(text, dump_config(config), unread) is not None
    except (ValueError, yaml.YAMLError):
        return True  # a damaged saved config: that run is replaced


def run_state(config: BaseRunConfig) -> tuple[str, RunMetrics | None]:
    """What the run folder holds for `config`: ("finished", its metrics), ("interrupted", None) — this
    config's run, not complete — or ("other", None): nothing, another config's run, or a run finished
    before per-utterance NLLs were saved. Compare owns its folders: it reuses, resumes or replaces."""
    run_dir = config.run_dir
    if not (run_dir / rundir.RESOLVED).exists() or _differs(run_dir / rundir.RESOLVED, config):
        return "other", None
    if not (run_dir / "metrics.json").exists():
        return "interrupted", None
    metrics = RunMetrics.read(run_dir / "metrics.json")
    if not metrics.complete:
        return "interrupted", None
    return ("finished", metrics) if (run_dir / TEST_NLL).exists() else ("other", None)


def execute(planned: list[Planned], out: Path, console=None) -> list[RunMetrics]:
    """Run (or reuse, or resume) every planned run, each in its own `cltune run` process, with progress."""
    results, started, ran = [], time.perf_counter(), 0
    for i, plan in enumerate(planned, 1):
        label = f"[{i}/{len(planned)}] {plan.strategy}, seed {plan.seed}"
        state, metrics = run_state(plan.config)
        if metrics is None:
            path = out / "configs" / f"{plan.config.name}.yaml"
            atomic_write_text(path, dump_config(plan.config))
            command = [sys.executable, "-m", "cltune", "run", str(path)]
            command.append("--resume" if state == "interrupted" else "--overwrite")
            if plan.phase1_from is not None:
                command += ["--phase1-from", str(plan.phase1_from)]
            if console:
                console.print(f"{label}: running{_eta(started, ran, len(planned) - i + 1)}")
            proc = _run_child(command)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
                raise UserError(f"compare: {plan.strategy}, seed {plan.seed} failed ({last}); its run folder is "
                                f"{plan.config.run_dir}; fix and rerun the same command to continue")
            ran += 1
            metrics = RunMetrics.read(plan.config.run_dir / "metrics.json")
        elif console:
            console.print(f"{label}: reused (finished earlier)")
        results.append(metrics)
    return results


def _run_child(command: list[str]) -> subprocess.CompletedProcess:
    """Run one `cltune run` in its own session, so that a Ctrl-C at the terminal reaches this process only:
    it is passed on once, and the run saves a step checkpoint and stops before this process does."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate()
        except BaseException as stop:
            proc.send_signal(getattr(stop, "signum", signal.SIGINT))  # Interrupted carries SIGTERM; Ctrl-C is SIGINT
            proc.communicate()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _eta(started: float, ran: int, left: int) -> str:
    if not ran:
        return ""
    return f", about {(time.perf_counter() - started) / ran * left / 60:.1f} min left"


# --- figures -------------------------------------------------------------------------------------


def _per_run(metrics: RunMetrics, reference: RunMetrics) -> dict:
    rows, routing = metrics.scored()  # the speaker-routed rows for task-routed strategies: no oracle task id
    ref_rows, _ = reference.scored()
    final = list(rows.ppl[-1])
    attribution = [v for v in rows.speaker_attribution[-1] if v is not None]
    phases = metrics.phases
    kept = phases[-2].strategy if len(phases) > 1 else {}  # what the last phase could replay or project against
    return {
        "routing": routing,
        "final_ppl": final,
        "forgetting_pct": rows.forgetting_pct or [],
        "peak_forgetting_pct": rows.peak_forgetting_pct or [],
        "bwt": rows.bwt, "fwt": rows.fwt,
        "new_task_ratio": final[-1] / ref_rows.ppl[-1][-1],
        "attribution": sum(attribution) / len(attribution) if attribution else None,
        "wall_s": sum(p.wall_s + sum(p.strategy.get("hooks_s", {}).values()) for p in phases),
        "target_tokens": sum(p.target_tokens for p in phases),
        "forward_tokens": _total(phases, "forward_tokens"), "backward_tokens": _total(phases, "backward_tokens"),
        "peak_rss_mb": metrics.peak_rss_mb,
        "trainable": metrics.parameters.get("trainable"),
        "adapter_params": metrics.adapter_params,
        "stored_utterances": kept.get("stored_utterances", 0),
        "test_sizes": [s["test"] for s in metrics.split_sizes],
    }


def _total(phases, key: str) -> int | None:
    """A pass count summed over phases; None when a phase did not record it (runs before the ledger had it)."""
    values = [p.strategy.get(key) for p in phases]
    return None if any(v is None for v in values) else sum(values)


def _ratio(value, reference):
    return None if value is None or not reference else value / reference


def _interval(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "low": None, "high": None}
    mean, low, high = mean_interval(values)
    return {"mean": mean, "low": low, "high": high}


def _test_nll(folder: Path, task: str, mode: str) -> dict:
    """One run's per-utterance test NLLs of `task` (`mode`: agnostic, else the run's own matrix)."""
    path = folder / TEST_NLL
    try:
        rows = read_json(path)
        rows = rows.get(mode) or rows.get("single") or rows["oracle"]
        entry = rows[task]
        return {"lines": list(entry["lines"]), "nll": list(entry["nll"]), "targets": list(entry["targets"])}
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: missing or damaged; rerun the same cltune compare command to redo that run") from None


def paired_change(strategy_dirs: list[Path], naive_dirs: list[Path], task: str, mode: str, count: int,
                  against_mode: str = "single") -> dict:
    """Per cent PPL change of a strategy against naive on `task`: the point estimate (mean over seeds of the paired
    ln-PPL difference on each seed's shared test utterances) and a 95% interval, the wider of two:

    - a t-interval over the seeds' paired differences (two or more seeds): each seed is one training run of each
      side, so their spread holds the runs' training noise — which pairing on one seed does not remove (on the
      podcast config a last-bit difference at one step grows into 9–27% a task by the end: two runs of naive
      parted so before commit 145c576 made runs reproducible; docs/benchmarks/long_streams.md) and which a
      bootstrap over 2–3 seeds understates;
    - `count` two-level bootstrap draws, seeds then each seed's utterances, both runs alike: the test-set noise,
      which a few seeds that happen to agree would hide.

    With one seed only the bootstrap (test-set noise alone), and `seeds: 1` says so. `mode` and `against_mode` name
    each side's final row (naive's is `single`)."""
    pairs = []
    for a_dir, b_dir in zip(strategy_dirs, naive_dirs):
        a, b = _test_nll(a_dir, task, mode), _test_nll(b_dir, task, against_mode)
        if a["lines"] != b["lines"]:
            raise UserError(f"{a_dir}: its test split of {task} differs from {b_dir}'s; compare runs of one stream")
        pairs.append(((a["nll"], a["targets"]), (b["nll"], b["targets"])))
    point, low, high = paired_interval(pairs, count)
    change = lambda x: 100 * (math.exp(x) - 1)  # noqa: E731 - ln-PPL difference → per cent PPL change
    return {"change_pct": change(point), "low_pct": change(low), "high_pct": change(high),
            "resolved": low > 0 or high < 0, "seeds": len(pairs)}


def summarize(planned: list[Planned], results: list[RunMetrics], bootstrap: int) -> dict:
    """Per strategy: intervals over seeds, the paired change against naive per task, the cost ledger."""
    by_seed = {(p.strategy, p.seed): (p, m) for p, m in zip(planned, results)}
    seeds = sorted({p.seed for p in planned})
    strategies = list(dict.fromkeys(p.strategy for p in planned))
    tasks = results[0].tasks
    out = {"tasks": tasks, "seeds": seeds, "bootstrap": bootstrap, "reference": REFERENCE, "strategies": {}}
    refs = [_per_run(by_seed[(REFERENCE, s)][1], by_seed[(REFERENCE, s)][1]) for s in seeds]  # naive's, per seed
    for name in strategies:
        runs = [_per_run(by_seed[(name, s)][1], by_seed[(REFERENCE, s)][1]) for s in seeds]
        entry = {
            "routing": runs[0]["routing"],
            "final_ppl": [_interval([r["final_ppl"][j] for r in runs]) for j in range(len(tasks))],
            "forgetting_pct": [_interval([r["forgetting_pct"][j] for r in runs]) for j in range(len(tasks) - 1)],
            "peak_forgetting_pct": [_interval([r["peak_forgetting_pct"][j] for r in runs])
                                    for j in range(len(tasks) - 1)],
            "bwt": _interval([r["bwt"] for r in runs]), "fwt": _interval([r["fwt"] for r in runs]),
            "new_task_ratio": _interval([r["new_task_ratio"] for r in runs]),
            "attribution": _interval([r["attribution"] for r in runs]),
            "wall_s": _interval([r["wall_s"] for r in runs]),
            "target_tokens": _interval([r["target_tokens"] for r in runs]),
            # model passes outside evaluation against naive's on the same seed (1.0: no extra work)
            "forward_vs_naive": _interval([_ratio(r["forward_tokens"], n["forward_tokens"])
                                           for r, n in zip(runs, refs)]),
            "backward_vs_naive": _interval([_ratio(r["backward_tokens"], n["backward_tokens"])
                                            for r, n in zip(runs, refs)]),
            "peak_rss_mb": _interval([r["peak_rss_mb"] for r in runs]),
            "trainable": runs[0]["trainable"], "adapter_params": runs[0]["adapter_params"],
            "stored_utterances": runs[0]["stored_utterances"],
            "test_sizes": [r["test_sizes"] for r in runs],
            # (seed, phase, times) where the loss guard took the weights back: the runs' output is not kept
            "guard_backoffs": [(s, ph.phase, ph.loss_guard_backoffs) for s in seeds
                               for ph in by_seed[(name, s)][1].phases if ph.loss_guard_backoffs],
        }
        if name != REFERENCE:
            dirs = [by_seed[(name, s)][0].config.run_dir for s in seeds]
            naive_dirs = [by_seed[(REFERENCE, s)][0].config.run_dir for s in seeds]
            mode = "agnostic" if entry["routing"] == "agnostic" else "single"
            entry["vs_naive"] = {t: paired_change(dirs, naive_dirs, t, mode, bootstrap) for t in tasks}
        out["strategies"][name] = entry
    return out


def run_compare(config_path: Path, strategies: list[str], seeds: int, sets: list[str], out: Path | None = None,
                bootstrap: int = 1000, console=None, ray: RayOptions | None = None) -> Path:
    """Plan, run (reusing what is done) and write compare.md/.csv/.html/.png; returns compare.md. `ray`: run them
    as Ray tasks (`cltune.studies.scale_out`), else one after another."""
    from cltune.studies.compare_report import write_outputs

    if bootstrap < 1:
        raise UserError("--bootstrap: at least 1 resample (1000 for intervals worth reading)")
    out = out or read_config(config_path, sets).output_dir / "compare"
    writable_folder(out, "comparison")
    planned = plan_runs(config_path, strategies, seeds, sets, out)
    if ray is not None:
        from cltune.studies.scale_out import execute_on_ray

        results = execute_on_ray(planned, out, ray, console)
    else:
        results = execute(planned, out, console)
    summary = summarize(planned, results, bootstrap)
    command = shlex.join(["cltune", "compare", str(config_path), "--strategies", ",".join(strategies), "--seeds",
                          str(seeds), *(arg for s in sets for arg in ("--set", s))])
    return write_outputs(summary, out, command)
