"""Several processes: a 2-process DDP run over gloo on the CPU gives the 1-process run's metrics,
and writes every file once.

Accelerate's `launch --cpu --num_processes 2` starts a single process unless MPI is set up
(`--mpirun_hostfile`); `launch --multi_gpu` starts them through torchrun, and on a machine without
CUDA cltune then forms a CPU (gloo) process group itself (`pipeline.make_accelerator`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cltune.modeling.checkpoint import verify
from cltune.training.loop import my_share

from helpers import tiny_run_config

pytestmark = pytest.mark.ddp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_process_joins_every_step_with_the_step_split_between_them():
    steps = [[[0, 1], [2, 3], [4]], [[5]]]
    shares = [[my_share(step, rank, 2) for rank in range(2)] for step in steps]
    assert shares[0] == [[([0, 1], 1.0), ([4], 1.0)], [([2, 3], 1.0)]]
    assert shares[1] == [[([5], 1.0)], [([5], 0.0)]]  # no micro-batch left: same forward at weight 0


def test_two_process_ddp_run_matches_the_one_process_run(tiny_model_dir, two_tasks, tmp_path):
    configs = {}
    for name in ("single", "ddp"):
        # batch 12 of micro-batches of 4: steps of 3 micro-batches (2 + 1 per process) and a last step of 1 (1 + 0)
        raw = tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", "ewc_replay", name=name)
        raw["train"].update({"batch_size": 12, "checkpoint_every": 2})
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    accelerate = Path(sys.executable).with_name("accelerate")
    ddp = subprocess.Popen([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no",
                            "--main_process_port", str(_free_port()),
                            "-m", "cltune", "run", str(configs["ddp"])], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    single = subprocess.run([sys.executable, "-m", "cltune", "run", str(configs["single"])], env=env,
                            capture_output=True, text=True)
    output = ddp.communicate(timeout=600)[0]
    assert single.returncode == 0, single.stderr
    assert ddp.returncode == 0, output[-3000:]

    runs = {name: tmp_path / "runs" / name for name in configs}
    metrics = {name: json.loads((runs[name] / "metrics.json").read_text()) for name in configs}
    assert metrics["ddp"]["processes"] == 2 and metrics["single"]["processes"] == 1
    worst = max(abs(d - s) / s for rd, rs in zip(metrics["ddp"]["ppl"], metrics["single"]["ppl"])
                for d, s in zip(rd, rs))
    print(f"DDP vs 1 process: largest relative PPL difference {worst:.2e}")
    assert worst < 1e-3  # same global batch per step; only the summation order differs
    assert [p["steps"] for p in metrics["ddp"]["phases"]] == [p["steps"] for p in metrics["single"]["phases"]]
    assert ([p["target_tokens"] for p in metrics["ddp"]["phases"]]
            == [p["target_tokens"] for p in metrics["single"]["phases"]])
    assert len(metrics["ddp"]["samples"]) == len(metrics["single"]["samples"])  # generated once, not per process
    for phase in ("phase1", "phase2"):
        verify(runs["ddp"] / phase)
        log = [json.loads(line) for line in (runs["ddp"] / phase / "train_log.jsonl").read_text().splitlines()]
        steps = [row["step"] for row in log if "loss" in row]
        assert steps == list(range(1, len(steps) + 1))  # one writer: each step logged once
    assert not list(runs["ddp"].rglob("*.tmp")) and not (runs["ddp"] / "steps").exists()
