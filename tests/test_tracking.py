"""Experiment tracking (`--log-with`): TensorBoard events hold the run's scalars; nothing is logged unless asked;
a missing tracker package is a one-line error before anything is written."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from helpers import run_cli, tiny_run_config


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_events_hold_the_logged_scalars(tmp_path, tiny_model_dir, two_tasks, monkeypatch, capsys):
    raw = tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", "ewc_replay")
    raw["eval"] = {"samples_per_speaker": 0, "batch_size": 16}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = run_cli(monkeypatch, capsys, "run", config, "--log-with", "tensorboard")
    assert result.code == 0, result.err
    run_dir = tmp_path / "runs" / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = [p["steps"] for p in metrics["phases"]]
    scalars = _events(run_dir / "logs" / "tiny")
    # every optimizer step of both phases, counted over the stream, with the train log's losses
    logged = [json.loads(line) for phase in ("phase1", "phase2")
              for line in (run_dir / phase / "train_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logged if "loss" in row]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, sum(steps) + 1))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(losses, abs=1e-4)
    assert {"train/lr", "train/tokens_per_s", "val/loss"} <= set(scalars)
    assert [v for _, v in scalars["val/loss"]] == pytest.approx([r["val_loss"] for r in logged if "val_loss" in r],
                                                                abs=1e-4)
    # after each phase, at its last step: the matrix row, attribution and forgetting
    ends = [steps[0], steps[0] + steps[1]]
    for task_index, task in enumerate(metrics["tasks"]):
        assert scalars[f"test_ppl/{task}"] == [(end, pytest.approx(row[task_index], rel=1e-6))
                                               for end, row in zip(ends, metrics["ppl"][1:])]
        assert [s for s, _ in scalars[f"attribution/{task}"]] == ends
    assert scalars["forgetting_pct/guest_a"] == [(ends[1], pytest.approx(metrics["forgetting_pct"][0], rel=1e-5))]
    assert "forgetting_pct/guest_b" not in scalars


def test_nothing_is_logged_unless_asked_and_a_missing_tracker_is_named(tmp_path, tiny_config, tiny_model_dir, two_tasks,
                                                                         monkeypatch, capsys):
    import importlib.util

    from cltune.studies.pipeline import run_stream

    metrics = run_stream(tiny_config("naive", ["eval.attribution=false", "eval.samples_per_speaker=0"]))
    assert math.isfinite(metrics.ppl[-1][0]) and not (tmp_path / "runs" / "tiny" / "logs").exists()

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    raw = tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "other", "naive")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    missing = run_cli(monkeypatch, capsys, "run", config, "--log-with", "wandb")
    assert missing.code == 2 and missing.err.strip() == \
        "error: --log-with wandb: the wandb package is not installed; run `pip install wandb`"
    assert not (tmp_path / "other").exists()
    unknown = run_cli(monkeypatch, capsys, "run", config, "--log-with", "neptune")
    assert unknown.code == 2 and "unknown tracker; choose from tensorboard, wandb, mlflow" in unknown.err
