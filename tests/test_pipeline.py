"""The pipeline around the loop on a tiny model: hook timing, what a phase counts and records, the start figures
and what is scored once (every strategy end to end: test_every_strategy.py)."""

from __future__ import annotations

import json
import math

import pytest

from cltune.studies.pipeline import run_stream


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


def test_validation_runs_when_something_reads_it(tiny_config, monkeypatch):
    """Without early stopping a phase validates once, at its end (the figure the pipeline reuses); `eval_every`
    validates every N steps and at the end; with `early_stopping_patience` once per epoch, stopping after that
    many validations without improvement (scripted validation figures here: 10, 12, then none needed)."""
    from cltune.training import loop

    def validations(config):
        metrics = run_stream(config)
        rows = [json.loads(line) for line in (config.run_dir / "phase1" / "train_log.jsonl").read_text().splitlines()]
        return metrics, [r["step"] for r in rows if "val_loss" in r]

    quiet = ["eval.samples_per_speaker=0", "train.epochs=3"]  # 48 training utterances, batch 8: 6 steps an epoch
    plain, checked = validations(tiny_config("naive", quiet, name="plain"))
    assert plain.phases[0].steps == 18 and checked == [18]
    _, checked = validations(tiny_config("naive", [*quiet, "train.eval_every=4"], name="every"))
    assert checked == [4, 8, 12, 16, 18]
    figures = iter([10.0, 12.0])
    real = loop.perplexity
    monkeypatch.setattr(loop, "perplexity", lambda *a, **k: next(figures, None) or real(*a, **k))
    stopping, checked = validations(tiny_config("naive", [*quiet, "train.early_stopping_patience=1"], name="stop"))
    assert checked == [6, 12] and stopping.phases[0].stopped_early
    assert stopping.phases[0].steps == 12 and stopping.phases[0].best_val_loss == pytest.approx(math.log(10.0))
