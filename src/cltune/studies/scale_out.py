"""Many runs at once: the runs of `cltune compare` and `cltune sweep` as Ray tasks, on this machine or a cluster.

Each run is the same `cltune run` process the serial path starts, launched by a Ray task that holds
`run_cpus` CPUs (and `run_gpus` GPUs) of the cluster, with torch's threads set to its CPUs. A run whose
phase 1 comes from naive's checkpoint of the same seed waits for that run (a Ray dependency), so
every run sees exactly what it would serially, and the metrics match the serial ones. Runs write into
the compare folder: on a cluster of several machines that folder must be on a filesystem every node
mounts at the same path. A run that fails is reported with the end of its log while the others go on;
the command then exits non-zero, and running it again reuses the finished runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cltune.config import BaseRunConfig, dump_config
from cltune.errors import UserError
from cltune.evaluation.results import RunMetrics
from cltune.storage.files import atomic_write_text

INSTALL_HINT = "pip install 'cltune[ray]'"
THREADS_PER_RUN = 4  # what a run gets by default on a machine without GPUs: more threads scale poorly on small models


def import_ray():
    """Ray, or a one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray: Ray is not installed; {INSTALL_HINT}") from None
    return ray


def check_options(ray: str | None, run_cpus: float | None, run_gpus: float | None) -> None:
    """Before any work: `--ray` needs its extra installed, and `--run-cpus`/`--run-gpus` need `--ray`."""
    if ray is not None:
        import_ray()
    elif run_cpus is not None or run_gpus is not None:
        raise UserError("--run-cpus and --run-gpus size Ray tasks; add --ray (alone for a Ray on this machine)")


@dataclass
class Job:
    """One run to make: its config, and the phase-1 checkpoint it takes instead of training phase 1 (the run
    that writes it, when it is one of the jobs, goes first)."""

    label: str
    config: BaseRunConfig
    phase1_from: Path | None = None


@dataclass
class Finished:
    """What one run's Ray task reports back."""

    code: int
    tail: str  # the last lines of its stderr (why it failed)
    node: str  # the node's IP address
    gpus: list[str]
    wall_s: float


def _run(command: list[str], threads: int, *after) -> Finished:
    """Inside a Ray task: one `cltune run` process with `threads` torch threads. `after`: the runs it waits for."""
    import ray

    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    context = ray.get_runtime_context()
    return Finished(proc.returncode, "\n".join(proc.stderr.strip().splitlines()[-8:]),
                    ray.util.get_node_ip_address(), [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
                    time.perf_counter() - start)


def _sees(marker: str, token: str) -> tuple[str, bool]:
    """Inside a probe task: this node's address, and whether it reads `token` from `marker`."""
    import ray

    try:
        seen = Path(marker).read_text(encoding="utf-8") == token
    except OSError:
        seen = False
    return ray.util.get_node_ip_address(), seen


def check_shared_folder(ray, folder: Path) -> None:
    """Runs write into `folder`: every alive node must see it at the same path (a shared filesystem). A probe
    task pinned to each node reads a marker written here; a node that cannot is named in a one-line error."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = f"{os.getpid()}-{time.time_ns()}"
    marker = folder / f".ray-probe-{token}"
    atomic_write_text(marker, token)
    try:
        probe = ray.remote(num_cpus=0)(_sees)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        answers = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                           .remote(str(marker.resolve()), token) for n in nodes])
    finally:
        marker.unlink(missing_ok=True)
    blind = [node for node, seen in answers if not seen]
    if blind:
        raise UserError(f"--ray: node(s) {', '.join(blind)} do not see {folder.resolve()}; runs write there, so put "
                        "it on a filesystem every node mounts at the same path (NFS, a cluster filesystem)")


def per_run_resources(ray, run_cpus: float | None, run_gpus: float | None) -> tuple[float, float]:
    """CPUs and GPUs each run holds: as given, else one GPU per run where the cluster has GPUs, else
    THREADS_PER_RUN CPUs (all of them on a smaller machine)."""
    total = ray.cluster_resources()
    gpus = run_gpus if run_gpus is not None else (1.0 if total.get("GPU", 0) >= 1 else 0.0)
    cpus = run_cpus if run_cpus is not None else float(min(THREADS_PER_RUN, max(1, int(total.get("CPU", 1)))))
    if cpus <= 0 or gpus < 0:
        raise UserError("--run-cpus must be above 0 and --run-gpus at least 0")
    if cpus > total.get("CPU", 0) or gpus > total.get("GPU", 0):
        raise UserError(f"--run-cpus {cpus:g} / --run-gpus {gpus:g}: the Ray cluster has {total.get('CPU', 0):g} CPUs "
                        f"and {total.get('GPU', 0):g} GPUs; ask for at most that per run")
    return cpus, gpus


def execute_on_ray(planned, out: Path, address: str, *, run_cpus: float | None = None, run_gpus: float | None = None,
                   console=None) -> list[RunMetrics]:
    """Run (or reuse, or resume) every planned run (anything with `label`, `config` and `phase1_from`: a `Job`,
    a compare's `Planned`) as a Ray task; their metrics, in order. `address` "local" starts a Ray for this
    command (stopped after it), anything else (`auto`, `ray://host:port`) joins a running cluster."""
    from cltune.studies.compare import run_state

    ray = import_ray()
    todo = []  # (plan, state) of the runs not finished yet
    for plan in planned:
        state, metrics = run_state(plan.config)
        if metrics is None:
            todo.append((plan, state))
        elif console:
            console.print(f"{plan.label}: reused (finished earlier)")
    if not todo:  # nothing to run: no cluster to start or join
        return [RunMetrics.read(plan.config.run_dir / "metrics.json") for plan in planned]
    ours = not ray.is_initialized()
    if ours:
        try:
            # "local" makes Ray start a new instance even where `ray start` left one running
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"--ray {address}: could not reach a Ray cluster ({str(err).splitlines()[0]}); "
                            "start one with `ray start --head`, or pass --ray alone for a local one") from None
    try:
        return _execute(ray, planned, todo, out, run_cpus, run_gpus, console)
    finally:
        if ours:
            ray.shutdown()


def _execute(ray, planned, todo, out: Path, run_cpus, run_gpus, console) -> list[RunMetrics]:
    cpus, gpus = per_run_resources(ray, run_cpus, run_gpus)
    check_shared_folder(ray, out)
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_run)
    threads = max(1, int(cpus))
    pending, by_dir, labels = {}, {}, {}
    for plan, state in todo:
        label = plan.label
        path = out / "configs" / f"{plan.config.name}.yaml"
        atomic_write_text(path, dump_config(plan.config))
        command = [sys.executable, "-m", "cltune", "run", str(path), "--resume" if state == "interrupted" else
                   "--overwrite"]
        after = []
        if plan.phase1_from is not None:
            command += ["--phase1-from", str(plan.phase1_from)]
            source = by_dir.get(plan.phase1_from.parent)
            after = [source] if source is not None else []
        ref = task.remote(command, threads, *after)
        pending[ref], labels[ref] = plan, label
        by_dir[plan.config.run_dir] = ref
    if console and pending:
        console.print(f"ray: {len(pending)} runs, {cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
                      + f" each, on {len(ray.nodes())} node(s)")
    failed, done, started = [], 0, time.perf_counter()
    waiting = list(pending)
    while waiting:
        [ref], waiting = ray.wait(waiting, num_returns=1)
        plan, finished = pending[ref], ray.get(ref)
        done += 1
        where = finished.node + (f" GPU {','.join(finished.gpus)}" if finished.gpus else "")
        eta = (time.perf_counter() - started) / done * len(waiting)
        if finished.code != 0:
            failed.append((labels[ref], plan.config.run_dir, finished.tail))
            line = f"{labels[ref]}: FAILED on {where} after {finished.wall_s:.0f} s"
        else:
            final = RunMetrics.read(plan.config.run_dir / "metrics.json").ppl[-1]
            line = (f"{labels[ref]}: done on {where} in {finished.wall_s:.0f} s, final mean PPL "
                    f"{sum(final) / len(final):.2f}")
        if console:
            console.print(f"[{done}/{len(pending)}] {line}" + (f"; about {eta / 60:.1f} min left" if waiting else ""),
                          markup=False, highlight=False)
    if failed:
        if console:
            for label, run_dir, tail in failed:
                console.print(f"{label} ({run_dir}) failed:\n{tail}", markup=False, highlight=False)
        raise UserError(f"compare: {len(failed)} of {len(pending)} runs failed ({', '.join(f[0] for f in failed)}); "
                        "the others finished; fix the cause and rerun the same command to continue")
    return [RunMetrics.read(plan.config.run_dir / "metrics.json") for plan in planned]
