"""Shared pieces of the benchmark scripts: the machine's description, the demo stream's context
built the way `cltune.studies.pipeline.run` builds it, and tokens/s of the real `train_phase` read from
its own train log.

Not part of the package or the tests: run the scripts in this folder directly.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "src" / "cltune" / "configs" / "demo.yaml"  # the shipped demo config
DEMO_DATA = ROOT / "data"  # where `make demo` writes the demo CSVs; the demo config names its files only


def cpu_description() -> dict:
    """lscpu model name, cores and the SIMD flags that decide fp32/bf16 speed."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    except (OSError, subprocess.CalledProcessError):
        fields = {}
    flags = set(fields.get("Flags", "").split())
    return {
        "model_name": fields.get("Model name", platform.processor() or "unknown"),
        "cpus": os.cpu_count(),
        "flags": {f: f in flags for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")},
    }


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def describe_machine() -> dict:
    import torch

    info = {"cpu": cpu_description(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "load_avg_start": [round(x, 2) for x in os.getloadavg()],
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict) -> str:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["cpu"]["flags"].items())
    gpu = f"; GPU {info['gpu']}" if "gpu" in info else ""
    env = "".join(f", {k}={v}" for k, v in info["env"].items())
    return (f"{info['cpu']['model_name']}, {info['cpu']['cpus']} CPUs ({flags}); torch {info['torch']}, "
            f"{info['threads']} threads{env}{gpu}; load avg at start {info['load_avg_start']}")


def ensure_demo_data(data: Path = DEMO_DATA) -> None:
    """Write the demo CSVs (from the installed chitchat-dataset package) when they are missing."""
    if not (data / "host_guest_a.csv").exists():
        from cltune.data.demo import write_demo_corpus

        write_demo_corpus(data)


@dataclass
class Stream:
    config: object
    ctx: object  # cltune.strategies.Context
    tasks: list
    speaker_tokens: list[str]
    base_params: int  # parameters of the frozen base model (tied embedding counted once)


def demo_stream(config_path: Path = DEMO_CONFIG, precision: str | None = None,
                overrides: list[str] | None = None) -> Stream:
    """Accelerator, tasks, model and Context exactly as `cltune.studies.pipeline.run` builds them (`build_session`)."""
    from accelerate.utils import set_seed

    from cltune.api import demo_config
    from cltune.training.session import build_session

    ensure_demo_data()
    sets = [*(overrides or []), *([f"model.precision={precision}"] if precision else [])]
    config = demo_config(config_path, DEMO_DATA, ROOT / "checkpoints", sets)
    set_seed(config.seed)
    session = build_session(config)
    counts = session.counts
    return Stream(config, session.ctx, session.tasks, sorted(set(session.speaker_tokens.values())),
                  counts["total"] - counts["trainable"])


def with_small_val(task, keep: int = 8):
    """The task with a short validation split: train_phase validates after its last step, outside the
    timed window, and a short split keeps that from eating the benchmark's time."""
    return replace(task, val=task.val[:keep])


def phase_settings(config, steps: int, **changes):
    """Phase-1 settings of the config, capped at `steps` optimizer steps, no mid-run validation or checkpoints."""
    from cltune.config import PhaseSettings

    merged = config.phase(0).model_dump()
    merged.update(max_steps=steps, eval_every=10**9, checkpoint_every=None, early_stopping_patience=None, **changes)
    return PhaseSettings(**merged)


@dataclass
class Timed:
    tokens_per_s: float
    step_s: float  # median seconds per optimizer step
    tokens: int  # target tokens in the timed window
    seconds: float
    load1: float


def window(points: list[tuple[float, int]], load: float) -> Timed:
    """Tokens/s from (seconds, cumulative target tokens) at the start of the run and at the end of each
    optimizer step. The script's warm-up run has already paid for lazy initialization."""
    if len(points) < 2:
        raise ValueError("need the start and at least one step")
    (t0, n0), (t1, n1) = points[0], points[-1]
    steps = [b[0] - a[0] for a, b in zip(points, points[1:])]
    return Timed((n1 - n0) / (t1 - t0), statistics.median(steps), n1 - n0, t1 - t0, load)


def run_cltune(stream: Stream, strategy, task, settings, phase: int = 0) -> Timed:
    """One call of the real `cltune.training.loop.train_phase`, timed from its own train log."""
    from cltune.training.loop import train_phase

    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "train_log.jsonl"
        train_phase(stream.ctx, strategy, task, strategy.train_data(task), settings, phase, log_path, None)
        rows = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines()]
    # elapsed_s counts from the loop's start (after the optimizer is built), as the baseline's clock does.
    points = [(0.0, 0)] + [(r["elapsed_s"], r["target_tokens"]) for r in rows if "target_tokens" in r]
    return window(points, load1())


def status_mb() -> dict[str, int]:
    """VmHWM (peak) and VmRSS (now) of this process in MB, from /proc."""
    with open("/proc/self/status") as fh:
        return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in fh if line.startswith(("VmHWM", "VmRSS"))}


def reset_peak() -> None:
    """VmHWM back to the current RSS, so the next peak is what comes after."""
    Path("/proc/self/clear_refs").write_text("5")


def median(values) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list]) -> str:
    """A compact Markdown table (readable in a terminal, pasteable into the docs)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
