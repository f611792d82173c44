"""The command line end to end in tmp_path: which files appear, exit codes, messages."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from conftest import tiny_run_config


def cltune(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cltune", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_train_then_generate_then_report(tiny_model_dir, two_tasks, tmp_path):
    out = tmp_path / "ckpt" / "guest_a"
    proc = cltune("train", "--data", two_tasks[0], "--out", out, "--model", tiny_model_dir,
                  "--set", "lora.r=4", "--set", "train.batch_size=8", "--set", "train.micro_batch_size=4",
                  "--set", "train.lr=5e-3", "--set", "data.max_length=24", "--set", "model.precision=fp32")
    assert proc.returncode == 0, proc.stderr
    assert "test PPL" in proc.stdout
    phase = out / "phase1"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.resolved.yaml",
            "train_log.jsonl", "metrics.json", "manifest.json"} <= {p.name for p in phase.iterdir()}
    record = json.loads((phase / "metrics.json").read_text())
    assert record["after"]["test_ppl"] < record["before"]["test_ppl"]
    assert set(record["before"]) == {"val_ppl", "test_ppl"}
    log = [json.loads(line) for line in (phase / "train_log.jsonl").read_text().splitlines()]
    assert {"step", "loss", "tokens_per_s", "lr"} <= set(log[0])

    gen = cltune("generate", phase, "--speaker", "guest a", "--max-new-tokens", "5", "--seed", "1")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip()
    unknown = cltune("generate", phase, "--speaker", "Nobody")
    assert unknown.returncode == 2 and "unknown speaker 'Nobody'" in unknown.stderr

    assert cltune("report", out).returncode == 0
    assert (out / "report.html").exists()


def test_run_refuses_to_overwrite_without_flag(tiny_model_dir, two_tasks, tmp_path):
    config = tmp_path / "run.yaml"
    raw = tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", "naive", eval={"samples_per_speaker": 0})
    config.write_text(yaml.safe_dump(raw))
    first = cltune("run", config, "--set", "train.max_steps=1")
    assert first.returncode == 0, first.stderr
    assert "Test perplexity" in first.stdout
    second = cltune("run", config)
    assert second.returncode == 2 and "already holds a run; pass --overwrite" in second.stderr


def test_unknown_config_key_exits_2(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("tasks: [{path: a.csv}]\nlearning_rate: 3\n")
    proc = cltune("run", config)
    assert proc.returncode == 2
    assert "learning_rate: Extra inputs are not permitted" in proc.stderr and "Traceback" not in proc.stderr


def test_strategies_lists_the_registry():
    from cltune.strategies import REGISTRY

    proc = cltune("strategies")
    assert proc.returncode == 0
    assert all(f"{name}:" in proc.stdout for name in REGISTRY)
