"""End-to-end: every registered strategy runs a 2-task stream on a tiny model and writes its files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cltune.evaluation.results import RunMetrics
from cltune.report import write_report
from cltune.strategies import REGISTRY
from cltune.studies.pipeline import run_stream


@pytest.mark.parametrize("strategy", sorted(REGISTRY))
def test_every_strategy_runs_a_two_task_stream(strategy_streams, strategy):
    raw, metrics = strategy_streams(strategy)  # the run test_reliability resumes against
    run_dir = Path(raw["output_dir"]) / raw["name"]
    assert metrics.tasks == ["guest_a", "guest_b"]
    assert len(metrics.ppl) == 3 and all(len(r) == 2 for r in metrics.ppl)
    assert all(math.isfinite(v) and v > 1 for r in metrics.ppl for v in r)
    # training on task 1 must lower its held-out perplexity on this easy synthetic data
    assert metrics.ppl[1][0] < metrics.ppl[0][0]
    assert len(metrics.forgetting_pct) == 1
    # one sample per speaker of every task after every phase (samples_per_speaker 1), tagged with its speaker
    expected = [(phase, s["task"], s["speaker"]) for phase in (1, 2) for s in
                [{"task": t, "speaker": sp}
                 for t, speakers in (("guest_a", ("Host", "Guest A")), ("guest_b", ("Host", "Guest B")))
                 for sp in speakers]]
    assert [(s.phase, s.task, s.speaker) for s in metrics.samples] == expected
    assert all(set(record.strategy["hooks_s"]) == {"before_task", "after_task"} for record in metrics.phases)
    for phase in ("phase1", "phase2"):
        files = {p.name for p in (run_dir / phase).iterdir()}
        assert {"adapter_model.safetensors", "config.resolved.yaml", "train_log.jsonl", "metrics.json",
                "manifest.json", "tokenizer.json"} <= files
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == metrics.to_json() and saved["schema_version"] == 2
    assert RunMetrics.read(run_dir / "metrics.json") == metrics
    md, html = write_report(run_dir)
    assert "Test perplexity matrix" in md.read_text() and "data:image/png;base64" in html.read_text()


def test_strategy_hooks_are_timed_apart_from_training(tiny_config, monkeypatch):
    """A before_task that takes 1.5 s shows in hooks_s, not in the phase's training wall time (the tiny
    phase trains in well under a second)."""
    import time

    from cltune.strategies.naive import Naive

    monkeypatch.setattr(Naive, "before_task", lambda self, task, resumed=False: time.sleep(1.5), raising=False)
    metrics = run_stream(tiny_config("naive", ["eval.attribution=false", "eval.samples_per_speaker=0"]))
    for record in metrics.phases:
        assert 1.5 <= record.strategy["hooks_s"]["before_task"] < 3.0
        assert record.strategy["hooks_s"]["after_task"] < 1.5
        assert record.wall_s < 1.5


def test_train_examples_counts_what_the_phase_trained_on(tiny_config):
    """Replay's phase 2 trains on task 2 plus 10% of task 1 (counted before after_task grows the buffer)."""
    metrics = run_stream(tiny_config("replay", ["eval.attribution=false", "eval.samples_per_speaker=0"]))
    train = [sizes["train"] for sizes in metrics.split_sizes]
    assert [p.train_examples for p in metrics.phases] == [train[0], train[1] + round(0.1 * train[0])]


def test_before_rows_describe_the_model_each_phase_starts_from(strategy_streams):
    """`before` is measured after before_task, through the router: for naive that is the previous row; for
    adapters a fresh task-2 adapter (the base model, as in row 0); for reptile the meta-trained start."""
    naive, adapters, reptile = (strategy_streams(s)[1] for s in ("naive", "adapters", "reptile"))
    assert naive.phases[1].before["test_ppl"] == pytest.approx(naive.ppl[1][1], rel=1e-9)
    assert adapters.phases[1].before["test_ppl"] == pytest.approx(adapters.ppl[0][1], rel=1e-6)
    assert adapters.phases[1].before["test_ppl"] != pytest.approx(adapters.ppl[1][1], rel=1e-6)
    assert reptile.phases[0].before["test_ppl"] != pytest.approx(reptile.ppl[0][0], rel=1e-6)


@pytest.mark.parametrize(("strategy", "test_scorings", "after_vals"),
                         [("naive", 0, 0), ("adapters", 1, 0), ("merge", 1, 2)])
def test_nothing_is_scored_twice_when_the_model_is_the_same(tiny_config, monkeypatch, strategy, test_scorings,
                                                            after_vals):
    """naive starts each phase from the model the last matrix row scored, so its `before` test PPL is that
    row's figure, not a second pass over the test set; adapters' phase 2 starts from a new adapter: scored.
    The `after` validation PPL is the loop's last validation when the phase ends on those weights; merge's
    after_task serves a merged adapter after every phase: validated again."""
    from cltune.studies import pipeline

    calls, score = [], pipeline.perplexity
    monkeypatch.setattr(pipeline, "perplexity", lambda acc, scorer, tok, examples, *a: calls.append(examples) or score(
        acc, scorer, tok, examples, *a))
    config = tiny_config(strategy, ["eval.samples_per_speaker=0"])
    metrics = run_stream(config)
    tests = [e for e in calls if e and e[0].split == "test"]
    assert len(tests) == test_scorings and len(calls) == len(metrics.phases) + test_scorings + after_vals  # val: before
    assert metrics.phases[0].before["test_ppl"] == metrics.ppl[0][0]
    if strategy == "naive":
        assert metrics.phases[1].before["test_ppl"] == metrics.ppl[1][1]
    for phase in metrics.phases[: len(metrics.phases) - after_vals]:  # the reused figure is the log's last val loss
        lines = (config.run_dir / f"phase{phase.phase}" / "train_log.jsonl").read_text().splitlines()
        last = [row["val_loss"] for row in map(json.loads, lines) if "val_loss" in row][-1]
        assert math.log(phase.after["val_ppl"]) == pytest.approx(last, abs=1e-5)


def test_the_pass_ledger_counts_training_and_strategy_work_not_evaluation(tiny_config):
    """naive: forward = backward = the padded positions its steps trained on; lwf adds a teacher forward per
    micro-batch (no backward); evaluation counts for nothing."""
    naive = run_stream(tiny_config("naive", ["eval.samples_per_speaker=0"], name="naive"))
    lwf = run_stream(tiny_config("lwf", ["eval.samples_per_speaker=0"], name="lwf"))
    for record in naive.phases:
        assert record.strategy["forward_tokens"] == record.strategy["backward_tokens"] >= record.target_tokens
    first, second = (p.strategy for p in lwf.phases)
    assert first == {**first, "forward_tokens": naive.phases[0].strategy["forward_tokens"]}  # phase 1: no teacher yet
    assert second["backward_tokens"] == naive.phases[1].strategy["backward_tokens"]
    assert second["forward_tokens"] == 2 * second["backward_tokens"]


def test_a_reused_phase_1_counts_the_source_training_and_its_own_hooks(tiny_config):
    """ewc taking naive's phase 1: naive's training passes, plus the Fisher passes ewc itself ran after it."""
    naive = run_stream(tiny_config("naive", ["eval.samples_per_speaker=0"], name="source"))
    config = tiny_config("ewc", ["eval.samples_per_speaker=0"], name="ewc")
    ewc = run_stream(config, reuse_phase1=config.output_dir / "source" / "phase1")
    source, reused = naive.phases[0].strategy, ewc.phases[0].strategy
    assert reused["phase1_from"] and reused["training_forward_tokens"] == source["training_forward_tokens"] > 0
    fisher = reused["forward_tokens"] - reused["training_forward_tokens"]
    # the Fisher pass has a backward
    assert fisher == reused["backward_tokens"] - reused["training_backward_tokens"] > 0
    # its own Fisher
    assert ewc.phases[1].strategy["forward_tokens"] > ewc.phases[1].strategy["training_forward_tokens"]
