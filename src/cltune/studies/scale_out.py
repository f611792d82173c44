"""Many runs at once: the runs of `cltune compare` and `cltune sweep` as Ray tasks, on this machine or a cluster.

Each run is the same `cltune run` process the serial path starts, launched by a Ray task that holds
`run_cpus` CPUs (and `run_gpus` GPUs) of one node, with torch's threads set to its CPUs. A run whose
phase 1 comes from naive's checkpoint of the same seed is submitted once that run has finished, so
every run sees exactly what it would serially, and the metrics match the serial ones. Runs write into
the compare folder: on a cluster of several machines that folder must be on a filesystem every node
mounts at the same path (a probe task on each node checks). A run that fails is reported with the end
of its log while the others go on (the runs that need its phase 1 fail with it); the command then exits
non-zero, and running it again reuses the finished runs. A run whose worker dies (a lost node, a killed
process) is resubmitted and resumes from its last step checkpoint, up to `retries` times. Ctrl-C asks
every running run to stop at a step checkpoint (through a marker file in the compare folder, which every
node sees) and names the command that continues."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from cltune.config import BaseRunConfig, dump_config
from cltune.errors import UserError
from cltune.evaluation.results import RunMetrics
from cltune.storage.files import atomic_write_text
from cltune.training import interrupt

INSTALL_HINT = "pip install 'cltune[ray]'"
STOP_MARKER = ".stop"  # in the compare or sweep folder: its runs stop at a step checkpoint
THREADS_PER_RUN = 4  # what a run gets by default on a machine without GPUs: more threads scale poorly on small models


def import_ray():
    """Ray, or a one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray: Ray is not installed; {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """How `--ray` runs a compare's or a sweep's runs: where (`address`: "local" starts a Ray for the command,
    `auto` or `ray://host:port` joins a cluster), what each run holds (None: `per_run_resources` decides), and how
    many times a run whose worker died is resumed on another."""

    address: str
    run_cpus: float | None = None
    run_gpus: float | None = None
    retries: int = 1


def ray_options(address: str | None, run_cpus: float | None, run_gpus: float | None,
                retries: int | None) -> RayOptions | None:
    """The CLI's Ray options, checked before any work: `--ray` needs its extra installed, and the options that
    size or retry Ray tasks need `--ray`. None: run serially."""
    if address is None:
        if run_cpus is not None or run_gpus is not None or retries is not None:
            raise UserError("--run-cpus, --run-gpus and --retries are for Ray tasks; add --ray (alone for a Ray on "
                            "this machine)")
        return None
    import_ray()
    if retries is not None and retries < 0:
        raise UserError("--retries: 0 or more")
    return RayOptions(address, run_cpus, run_gpus, 1 if retries is None else retries)


@dataclass
class Job:
    """One run to make: its config, and the phase-1 checkpoint it takes instead of training phase 1 (the run
    that writes it, when it is one of the jobs, finishes before this one starts)."""

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


def _child_setup():
    """A `preexec_fn` for a run's process. Ray's worker thread blocks SIGINT, and a blocked signal stays blocked
    across exec: unblocked here, so the run can be asked to stop at a step checkpoint. And on Linux, the kernel
    kills the run when the Ray worker that started it dies, so a retried run never meets an orphan of its first
    attempt still writing into its folder (the libc call is looked up here, before the fork)."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    stoppers, death_signal = {signal.SIGINT, signal.SIGTERM}, int(signal.SIGKILL)

    def setup() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stoppers)
        if prctl is not None:
            prctl(1, death_signal)  # 1: PR_SET_PDEATHSIG

    return setup


def _run(command: list[str], threads: int, stop_marker: str, cwd: str) -> Finished:
    """Inside a Ray task: one `cltune run` process with `threads` torch threads, in the command's working
    folder `cwd` where this node has it (relative paths in configs mean what they mean serially). Once
    `stop_marker` exists (the command was stopped), a run not started yet does not start and a running one
    gets SIGINT: it saves a step checkpoint and exits 130, and the task reports that."""
    import ray

    start = time.perf_counter()
    context = ray.get_runtime_context()
    where = ray.util.get_node_ip_address(), [str(g) for g in context.get_accelerator_ids().get("GPU", [])]
    stop = Path(stop_marker)
    if stop.exists():
        return Finished(128 + signal.SIGINT, "not started: the command was stopped", *where, 0.0)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+", encoding="utf-8") as err:
        # its own session: a Ctrl-C at the terminal reaches the command, which stops the runs through `stop`
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env,
                                cwd=cwd if Path(cwd).is_dir() else None, start_new_session=True,
                                preexec_fn=_child_setup())
        asked = False
        while proc.poll() is None:
            if not asked and stop.exists():
                proc.send_signal(signal.SIGINT)
                asked = True
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        err.seek(0)
        tail = "\n".join(err.read().strip().splitlines()[-8:])
    return Finished(proc.returncode, tail, *where, time.perf_counter() - start)


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
    THREADS_PER_RUN CPUs (all of them on a smaller machine). A run must fit on one node: Ray would
    otherwise keep it waiting for a node that never comes."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    gpus = run_gpus if run_gpus is not None else (1.0 if any(n.get("GPU", 0) >= 1 for n in nodes) else 0.0)
    most_cpus = max((n.get("CPU", 0) for n in nodes if n.get("GPU", 0) >= gpus), default=0)  # where a run fits
    cpus = run_cpus if run_cpus is not None else float(min(THREADS_PER_RUN, max(1, int(most_cpus))))
    if cpus <= 0 or gpus < 0:
        raise UserError("--run-cpus must be above 0 and --run-gpus at least 0")
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        sizes = ", ".join(sorted({f"{n.get('CPU', 0):g} CPUs and {n.get('GPU', 0):g} GPUs" for n in nodes}))
        raise UserError(f"--run-cpus {cpus:g} / --run-gpus {gpus:g}: no node of the Ray cluster has that much (its "
                        f"nodes have {sizes or 'nothing'}); a run must fit on one node, so ask for at most that")
    return cpus, gpus


def execute_on_ray(planned, out: Path, options: RayOptions, console=None) -> list[RunMetrics]:
    """Run (or reuse, or resume) every planned run (anything with `label`, `config` and `phase1_from`: a `Job`,
    a compare's `Planned`) as a Ray task, as `options` say; their metrics, in order. A Ray this command
    starts is stopped after it."""
    from cltune.studies.compare import run_state

    ray = import_ray()
    todo = []  # the runs not finished yet
    for plan in planned:
        state, metrics = run_state(plan.config)
        if metrics is None:
            todo.append(plan)
        elif console:
            console.print(f"{plan.label}: reused (finished earlier)")
    if not todo:  # nothing to run: no cluster to start or join
        return [RunMetrics.read(plan.config.run_dir / "metrics.json") for plan in planned]
    ours = not ray.is_initialized()
    if ours:
        if options.address == "local":  # a Ray of this command only: its notice about token auth is not for the user
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        try:
            # "local" makes Ray start a new instance even where `ray start` left one running
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"--ray {options.address}: could not reach a Ray cluster ({str(err).splitlines()[0]}); "
                            "start one with `ray start --head`, or pass --ray alone for a local one") from None
    try:
        resources = per_run_resources(ray, options.run_cpus, options.run_gpus)
        _Scheduler(ray, todo, out, *resources, options.retries, console).run()
    finally:
        if ours:
            ray.shutdown()
    return [RunMetrics.read(plan.config.run_dir / "metrics.json") for plan in planned]


class _Scheduler:
    """Submits the runs as Ray tasks — a run that takes its phase 1 from another's checkpoint only once that
    run has finished — and collects them: a finished run is reported with where it ran, a failed one with its
    log tail (the runs that need it fail with it), a run whose worker died is resubmitted to resume, and a
    Ctrl-C stops every run at a step checkpoint before the command stops."""

    def __init__(self, ray, todo, out: Path, cpus: float, gpus: float, retries: int, console) -> None:
        check_shared_folder(ray, out)
        self.ray, self.cpus, self.gpus, self.retries, self.console = ray, cpus, gpus, retries, console
        self.out = out.resolve()  # what every node reads: absolute paths
        self.task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_run)
        self.stop = self.out / STOP_MARKER
        self.stop.unlink(missing_ok=True)
        self.total = len(todo)
        making = {plan.config.run_dir for plan in todo}
        # runs waiting for the run folder whose phase 1 they take
        self.blocked = {plan.label: plan.phase1_from.parent for plan in todo
                        if plan.phase1_from is not None and plan.phase1_from.parent in making}
        self.plans = {plan.label: plan for plan in todo}
        self.running: dict = {}  # Ray reference → label
        self.tries = dict.fromkeys(self.plans, 0)
        self.failed: list[tuple[str, Path, str]] = []
        self.done = 0
        self.started = time.perf_counter()

    def run(self) -> None:
        for label in self.plans:
            if label not in self.blocked:
                self._submit(label)
        self._say(f"ray: {self.total} runs, {self.cpus:g} CPUs" + (f" and {self.gpus:g} GPUs" if self.gpus else "")
                  + f" each, on {len(self.ray.nodes())} node(s)")
        with self._progress_bar() as self.bar:
            try:
                while self.running:
                    ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=1.0)  # 1 s: Ctrl-C gets in
                    for ref in ready:
                        self._collect(ref)
                    if self.bar:
                        self.bar.update(self.bar.task_ids[0], completed=self.done + len(self.failed))
            except KeyboardInterrupt:
                self._stop_all()
        if self.failed:
            for label, run_dir, tail in self.failed:
                self._say(f"{label} ({run_dir}) failed:\n{tail}")
            names = ", ".join(f[0] for f in self.failed)
            raise UserError(f"{len(self.failed)} of {self.total} runs failed ({names}); the others finished; fix the "
                            "cause and rerun the same command to continue")

    def _progress_bar(self):
        """On a terminal, one bar over all runs with the time left (the finished-run lines print above it)."""
        if not (self.console and self.console.is_terminal):
            return nullcontext(None)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(), TextColumn("· left"),
                       TimeRemainingColumn(), console=self.console, transient=True)
        bar.add_task("runs", total=self.total)
        return bar

    def _submit(self, label: str) -> None:
        from cltune.studies.compare import run_state

        plan = self.plans[label]
        state, _ = run_state(plan.config)
        path = self.out / "configs" / f"{plan.config.name}.yaml"
        atomic_write_text(path, dump_config(plan.config))
        command = [sys.executable, "-m", "cltune", "run", str(path),
                   "--resume" if state == "interrupted" else "--overwrite"]
        if plan.phase1_from is not None:
            command += ["--phase1-from", str(plan.phase1_from.resolve())]
        self.tries[label] += 1
        self.running[self.task.remote(command, max(1, int(self.cpus)), str(self.stop), os.getcwd())] = label

    def _collect(self, ref) -> None:
        from cltune.studies.compare import run_state

        label = self.running.pop(ref)
        plan = self.plans[label]
        try:
            finished = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:  # the task's own code raised: a failure, not a lost worker
            self._fail(label, f"its Ray task raised {str(err).strip().splitlines()[-1]}")
            return
        except self.ray.exceptions.RayError as err:  # its worker or node died
            cause = type(err).__name__
            if run_state(plan.config)[1] is not None:  # it had finished and written everything first
                self._finished(plan, label, "on a worker that died after it finished")
            elif self.tries[label] <= self.retries:
                self._say(f"{label}: its worker died ({cause}); resuming it from its last step checkpoint on a live "
                          f"worker (retry {self.tries[label]} of {self.retries})")
                self._submit(label)
            else:
                self._fail(label, f"its worker died ({cause}) on each of {self.tries[label]} tries; raise --retries "
                           "or look at the node's memory (`ray logs`)")
            return
        where = finished.node + (f" GPU {','.join(finished.gpus)}" if finished.gpus else "")
        if finished.code != 0:
            self._fail(label, finished.tail, f"FAILED on {where} after {finished.wall_s:.0f} s")
            return
        self._finished(plan, label, f"on {where} in {finished.wall_s:.0f} s")

    def _finished(self, plan, label: str, how: str) -> None:
        self.done += 1
        final = RunMetrics.read(plan.config.run_dir / "metrics.json").ppl[-1]
        self._say(f"[{self.done}/{self.total}] {label}: done {how}, final mean PPL {sum(final) / len(final):.2f}"
                  f"{self._eta()}")
        for waiting in [w for w, source in self.blocked.items() if source == plan.config.run_dir]:
            del self.blocked[waiting]
            self._submit(waiting)

    def _fail(self, label: str, tail: str, how: str = "FAILED") -> None:
        plan = self.plans[label]
        self.failed.append((label, plan.config.run_dir, tail))
        self._say(f"{label}: {how}")
        for waiting in [w for w, source in self.blocked.items() if source == plan.config.run_dir]:
            del self.blocked[waiting]
            self._fail(waiting, f"its phase 1 comes from {label}, which failed", "not run")

    def _eta(self) -> str:
        left = self.total - self.done - len(self.failed)
        if not left:
            return ""
        return f"; about {(time.perf_counter() - self.started) / self.done * left / 60:.1f} min left"

    def _stop_all(self) -> None:
        """Ctrl-C: every running run saves a step checkpoint and stops (a second Ctrl-C stops at once, without)."""
        self._say(f"Ctrl-C: stopping {len(self.running)} running run(s) at their next step checkpoint "
                  "(Ctrl-C again stops at once, without)")
        atomic_write_text(self.stop, "stop")
        try:
            stopped = 0
            for ref in list(self.running):
                try:
                    stopped += self.ray.get(ref).code == 128 + signal.SIGINT
                except self.ray.exceptions.RayError:
                    pass
        finally:
            self.stop.unlink(missing_ok=True)
        raise interrupt.Interrupted(signal.SIGINT, f"with {self.done} of {self.total} runs finished and {stopped} "
                                    "stopped at a step checkpoint")

    def _say(self, line: str) -> None:
        if self.console:
            self.console.print(line, markup=False, highlight=False)
