"""The summary and the report say what each figure means and whether it is good: from hand-built
metrics.json files of 2-task runs (no training), so each asserted number is computed here by hand."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from matplotlib.colors import to_rgb
from rich.console import Console

from cltune.api import make_config
from cltune.config import BaseRunConfig, dump_config
from cltune.evaluation.results import AgnosticRows, RunMetrics, Sample
from cltune.report import print_summary, write_report
from cltune.report import write as report_write
from cltune.report.plots import heatmap_figure
from cltune.storage.verified import write_folder

TASKS = ["guest_a", "guest_b"]
TOKENS = {"Host": "<HOST>", "Guest A": "<GUEST_A>", "Guest B": "<GUEST_B>"}
# guest_a: 10.0 right after learning it, 12.5 at the end: 25% worse; guest_b: 30 untrained, 25 before its phase
RISE = [[20.0, 30.0], [10.0, 25.0], [12.5, 8.0]]
ATTRIBUTION = [[0.5, 0.5], [0.75, 0.5], [0.625, 0.875]]


def _metrics(ppl, strategy="ewc_replay", **extra) -> RunMetrics:
    samples = [Sample(phase=2, task=task, speaker=speaker, token=TOKENS[speaker], text="hi")
               for task, guest in zip(TASKS, ("Guest A", "Guest B")) for speaker in ("Host", guest)]
    return RunMetrics(run="words", strategy=strategy, model="tiny", precision="fp32", processes=1, tasks=TASKS,
                      speaker_tokens=TOKENS, parameters={"lora": 10, "new_token_rows": 2},
                      split_sizes=[{"train": 8, "val": 2, "test": 8}] * 2, ppl=ppl, speaker_attribution=ATTRIBUTION,
                      samples=samples, **extra).with_summary()


def _run_dir(tmp_path, metrics: RunMetrics, router: dict | None = None):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics.write(run_dir / "metrics.json")
    config = make_config({"name": "run", "output_dir": str(tmp_path), "strategy": metrics.strategy,
                          "tasks": [{"name": t, "path": f"{t}.csv"} for t in TASKS]})
    (run_dir / "config.resolved.yaml").write_text(dump_config(config), encoding="utf-8")
    if router is not None:  # a phase checkpoint as the pipeline saves it: log, router table, manifest
        def fill(folder):
            (folder / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n', encoding="utf-8")
            (folder / "router.json").write_text(json.dumps(router), encoding="utf-8")
        write_folder(run_dir / "phase2", fill)
    return run_dir


def _summary(metrics: RunMetrics) -> str:
    console = Console(record=True, width=400)
    print_summary(console, metrics)
    return console.export_text()


def test_a_rise_reads_as_forgetting_with_its_percentage_and_the_transfer_signs():
    metrics = _metrics(RISE)
    text = _summary(metrics)
    assert "guest_a: 25.0% worse than right after learning it (forgetting); test PPL 10.00 → 12.50" in text
    # BWT = ln 10 − ln 12.5 = −0.2231 (hurt); FWT = ln 30 − ln 25 = +0.1823 (helped), as perplexity factors
    assert "BWT -0.2231: later phases hurt the earlier tasks (perplexity ×1.250, 25.0% higher" in text
    assert ("FWT +0.1823: earlier phases already helped the later tasks before their own phase "
            "(perplexity ×0.833, 16.7% lower") in text
    assert "lower is better" in text and "negative means later phases hurt earlier tasks" in text
    assert "guest_a 62.5% (chance 50% with 2 speakers), guest_b 87.5% (chance 50% with 2 speakers)" in text
    assert "Scored by: one model for every task" in text


def test_an_improvement_reads_better_not_forgetting():
    metrics = _metrics([[20.0, 30.0], [10.0, 25.0], [9.2, 8.0]])
    text = _summary(metrics)
    assert "guest_a: 8.0% better than right after learning it (later tasks helped)" in text
    assert "forgetting)" not in text.split("guest_a: ", 1)[1].splitlines()[0]
    assert "BWT +0.0834: later phases helped the earlier tasks" in text


def test_the_report_explains_its_figures_and_shows_attribution_in_percent(tmp_path):
    md, html = write_report(_run_dir(tmp_path, _metrics(RISE)))
    report = md.read_text(encoding="utf-8")
    assert "guest_a: 25.0% worse than right after learning it (forgetting)" in report
    assert "| guest_a | +25.00% | +25.00% | 25.0% worse than right after learning it (forgetting) |" in report
    assert "| 2: guest_b | 62.5% | 87.5% |" in report  # attribution as percentages, beside chance
    assert "guest_a: chance 50% with 2 speakers" in report
    assert "in the heatmap darker is worse" in report and "## Forgetting (one model for every task)" in report
    page = html.read_text(encoding="utf-8")
    # heatmap, each task over the phases, forgetting (no phases logged: no loss curves)
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page
    assert "![each task's perplexity over the phases](report_assets/ppl_lines.png)" in report
    assert "&lt;HOST&gt;" in page and "<HOST>" not in page  # speaker tokens are text, never markup


def _config_block(report: str) -> dict:
    return yaml.safe_load(re.search(r"## Config\n.*?```yaml\n(.*?)```", report, re.S).group(1))


def test_the_report_config_shows_only_the_chosen_strategy_settings(tmp_path):
    metrics = _metrics(RISE, strategy="fusion", settings_sections=["replay", "fusion"])
    run_dir = _run_dir(tmp_path, metrics)
    report = write_report(run_dir)[0].read_text(encoding="utf-8")
    shown = _config_block(report)
    assert set(shown) == set(BaseRunConfig.model_fields) | {"replay", "fusion"}
    assert "ewc" in yaml.safe_load((run_dir / "config.resolved.yaml").read_text())  # the full file keeps them all
    assert f"`{(run_dir / 'config.resolved.yaml').resolve()}`" in report


def test_a_run_without_recorded_sections_shows_those_named_after_its_strategy(tmp_path):
    report = write_report(_run_dir(tmp_path, _metrics(RISE, strategy="ewc_replay")))[0].read_text(encoding="utf-8")
    shown = _config_block(report)
    assert {"ewc", "replay"} <= set(shown) and not {"progressive", "adapters", "lwf", "fusion"} & set(shown)


PROGRESSIVE_ROUTER = {"kind": "progressive", "tasks": ["default", "task2"], "at_rest": "task2",
                      "routes": {"<HOST>": ["default", "task2"], "<GUEST_A>": ["default", "task2"],
                                 "<GUEST_B>": ["task2"]}}


@pytest.mark.parametrize("shared", ["likelihood", "latest", "validated"])
def test_a_routed_run_is_scored_and_charted_by_speaker_routing(tmp_path, monkeypatch, shared):
    # oracle: each task its own column, exactly as learned (0%); routed by speaker token: guest_a 10% worse
    routed = AgnosticRows(ppl=[[20.0, 30.0], [10.0, 25.0], [11.0, 8.5]], speaker_attribution=ATTRIBUTION)
    metrics = _metrics([[20.0, 30.0], [10.0, 25.0], [10.0, 8.0]], strategy="progressive", routing="oracle",
                       agnostic=routed, settings_sections=["progressive"])
    charted = {}
    real_bars = report_write.forgetting_bars

    def spy(values, tasks, path, routing=""):
        charted.update(values=values, routing=routing)
        return real_bars(values, tasks, path, routing)

    monkeypatch.setattr(report_write, "forgetting_bars", spy)
    router = {**PROGRESSIVE_ROUTER, "shared_speakers": shared}
    if shared == "validated":  # one column a speaker, chosen on validation: guest A now by guest B's column
        router["routes"] = {"<HOST>": ["task2"], "<GUEST_A>": ["task2"], "<GUEST_B>": ["task2"]}
    report = write_report(_run_dir(tmp_path, metrics, router))[0].read_text(encoding="utf-8")
    assert charted["values"] == pytest.approx([10.0]) and charted["routing"] == "routed by speaker token"
    assert "## Forgetting (routed by speaker token)" in report and "| guest_a | +10.00% |" in report
    assert "guest_a: 10.0% worse than right after learning it (forgetting)" in report
    assert "With the task id given (oracle task id, which users do not have): guest_a: unchanged" in report
    assert "matrix (oracle task id)" in report and "Scored by **routed by speaker token**" in report
    if shared == "likelihood":  # the caption follows the router the evaluation used, not fixed text
        assert ("Host `<HOST>` → an equal-prior mixture of guest_a's and guest_b's columns" in report
                and "the latest task with that speaker" not in report)
    elif shared == "latest":
        assert "Host `<HOST>` → guest_b's column (the latest task with that speaker)" in report
    else:
        assert ("Guest A `<GUEST_A>` → guest_b's column;" in report and "equal-prior mixture" not in report
                and "Each speaker's route was chosen after the phase — its own column, a later one or their "
                    "mixture — by the lowest perplexity on its validation utterances" in report)
    assert "Guest B `<GUEST_B>` → guest_b's column" in report
    assert set(_config_block(report)) == set(BaseRunConfig.model_fields) | {"progressive"}
    text = _summary(metrics)
    assert "Scored by: routed by speaker token" in text and "guest_a: 10.0% worse" in text


def test_the_heatmap_has_a_colorbar_that_says_darker_is_worse():
    fig = heatmap_figure(RISE, TASKS)
    ax = fig.axes[0]
    image = ax.images[0]
    bar = image.colorbar
    assert bar is not None and "lower is better: darker = worse" in bar.ax.get_ylabel()
    labels = [t.get_text() for t in bar.ax.get_yticklabels()]
    assert labels[0] == "8 better" and labels[-1] == "30 worse"
    # the colour of the worst (highest) perplexity is darker than that of the best
    luminance = [sum(w * c for w, c in zip((0.299, 0.587, 0.114), to_rgb(image.cmap(image.norm(v)))))
                 for v in (30.0, 8.0)]
    assert luminance[0] < luminance[1]
    assert ax.get_xlabel().startswith("evaluated on") and ax.get_ylabel().startswith("after phase")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["before training", "1: guest_a", "2: guest_b"]


def test_the_line_chart_draws_each_tasks_column_over_the_phases_and_marks_where_it_was_learned():
    from cltune.report.plots import lines_figure

    ppl = [[20.0, 30.0, 40.0], [10.0, 25.0, 35.0], [12.0, 8.0, 33.0], [13.0, 9.0, 7.0]]
    fig = lines_figure(ppl, ["guest_a", "guest_b", "guest_c"])
    ax = fig.axes[0]
    whole = [line for line in ax.lines if line.get_linestyle() == "-"]
    assert [list(line.get_ydata()) for line in whole] == [[row[j] for row in ppl] for j in range(3)]
    stars = [line for line in ax.lines if line.get_marker() == "*"]
    assert [(list(s.get_xdata()), list(s.get_ydata())) for s in stars] == [([1], [10.0]), ([2], [8.0]), ([3], [7.0])]
    assert ax.get_yscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == [
        "before", "1: guest_a", "2: guest_b", "3: guest_c"]
