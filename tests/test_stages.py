"""Where a run's time goes: metrics.json's `stages_s`, and the summary's last line."""

from __future__ import annotations

import json
import time

import yaml

from helpers import tiny_run_config


def test_stages_account_for_the_run_and_put_each_piece_of_work_in_its_place(tiny_config, monkeypatch):
    """Hooks that sleep show in `hooks`, training in `train`, test scoring with attribution in `evaluate` and
    `attribution`, and the stages together cover the run's wall time."""
    from cltune.strategies.naive import Naive
    from cltune.studies.pipeline import run_stream

    monkeypatch.setattr(Naive, "after_task", lambda self, task: time.sleep(0.6), raising=False)
    config = tiny_config("naive")
    start = time.perf_counter()
    metrics = run_stream(config)
    wall = time.perf_counter() - start
    stages = metrics.stages_s
    assert list(stages) == ["load", "train", "evaluate", "attribution", "hooks", "samples", "save", "report"]
    assert 1.2 <= stages["hooks"] < 1.2 + 0.5  # two phases' after_task, nothing else
    assert 0 < stages["train"] <= sum(p.wall_s for p in metrics.phases)
    assert stages["load"] > 0 and stages["evaluate"] > 0 and stages["attribution"] > 0 and stages["save"] > 0
    assert stages["samples"] > 0 and stages["report"] == 0  # the pipeline writes no report; the command does
    assert 0.75 * wall <= sum(stages.values()) <= wall  # a few bookkeeping milliseconds are nobody's
    assert json.loads((config.run_dir / "metrics.json").read_text())["stages_s"] == stages


def test_attribution_costs_nothing_when_it_is_off(tiny_config):
    from cltune.studies.pipeline import run_stream

    metrics = run_stream(tiny_config("naive", ["eval.attribution=false", "eval.samples_per_speaker=0"]))
    assert metrics.stages_s["attribution"] == 0 and metrics.stages_s["samples"] == 0
    assert metrics.stages_s["evaluate"] > 0


def test_the_command_prints_where_the_time_went_and_records_the_report(cli, tiny_model_dir, two_tasks, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs")))
    result = cli("run", config)
    assert result.code == 0, result.err
    [line] = [line for line in result.out.splitlines() if line.startswith("time: ")]
    stages = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())["stages_s"]
    assert stages["report"] > 0  # added after the report was written
    assert line.startswith(f"time: {sum(stages.values()):.0f} s — ")
    largest = max(stages, key=stages.get)
    assert line.split(" — ")[1].startswith(f"{largest} {stages[largest]:.1f} s (")


def test_one_model_samples_every_task_in_one_batch_and_a_routed_one_per_task(tiny_config, monkeypatch):
    """A generation step costs about as much for 8 rows as for 4: where one model serves every task the
    report's samples of all tasks are one batch per phase; a task-routed strategy samples each task under
    its own weights. Either way the rows come in task and speaker order."""
    from cltune.modeling import generate
    from cltune.studies.pipeline import run_stream

    batches = []
    real = generate.sample_continuations
    monkeypatch.setattr(generate, "sample_continuations",
                        lambda model, tokenizer, prompts, **kw: batches.append(len(prompts)) or real(
                            model, tokenizer, prompts, **kw))
    expected = [(phase, task, speaker) for phase in (1, 2) for task, guest in (("guest_a", "Guest A"),
                                                                              ("guest_b", "Guest B"))
                for speaker in ("Host", guest) for _ in range(2)]
    for strategy, per_phase in (("naive", [8]), ("adapters", [4, 4])):
        batches.clear()
        metrics = run_stream(tiny_config(strategy, ["eval.samples_per_speaker=2", "eval.attribution=false"],
                                         name=strategy))
        assert batches == per_phase * 2, strategy
        assert [(s.phase, s.task, s.speaker) for s in metrics.samples] == expected, strategy
        assert all(s.text is not None for s in metrics.samples)
