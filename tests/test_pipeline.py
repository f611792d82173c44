"""End-to-end: every registered strategy runs a 2-task stream on a tiny model and writes its files."""

from __future__ import annotations

import json
import math

import pytest

from cltune.pipeline import run
from cltune.report import write_report
from cltune.strategies import REGISTRY


@pytest.mark.parametrize("strategy", sorted(REGISTRY))
def test_every_strategy_runs_a_two_task_stream(tiny_config, strategy):
    config = tiny_config(strategy)
    metrics = run(config)
    run_dir = config.run_dir
    assert metrics["tasks"] == ["guest_a", "guest_b"]
    assert len(metrics["ppl"]) == 3 and all(len(r) == 2 for r in metrics["ppl"])
    assert all(math.isfinite(v) and v > 1 for r in metrics["ppl"] for v in r)
    # training on task 1 must lower its held-out perplexity on this easy synthetic data
    assert metrics["ppl"][1][0] < metrics["ppl"][0][0]
    assert len(metrics["forgetting_pct"]) == 1
    # one sample per speaker of every task after every phase (samples_per_speaker 1), tagged with its speaker
    expected = [(phase, s["task"], s["speaker"]) for phase in (1, 2) for s in
                [{"task": t, "speaker": sp} for t, speakers in (("guest_a", ("Host", "Guest A")), ("guest_b", ("Host", "Guest B")))
                 for sp in speakers]]
    assert [(s["phase"], s["task"], s["speaker"]) for s in metrics["samples"]] == expected
    for record in metrics["phases"]:  # the strategy's own work is timed apart from training
        assert set(record["strategy"]["hooks_s"]) == {"before_task", "after_task"}
        assert all(t >= 0 for t in record["strategy"]["hooks_s"].values())
    for phase in ("phase1", "phase2"):
        files = {p.name for p in (run_dir / phase).iterdir()}
        assert {"adapter_model.safetensors", "config.resolved.yaml", "train_log.jsonl", "metrics.json",
                "manifest.json", "tokenizer.json"} <= files
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["ppl"] == metrics["ppl"]
    md, html = write_report(run_dir)
    assert "Test perplexity matrix" in md.read_text() and "data:image/png;base64" in html.read_text()
