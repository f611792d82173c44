"""Rich tables for the terminal, built from EDA summaries and run metrics."""

from __future__ import annotations

from rich.table import Table

from cltune.evaluation.results import AgnosticRows, RunMetrics
from cltune.report.words import (
    BWT_MEANING,
    FWT_MEANING,
    attribution_words,
    bwt_words,
    final_ppl_words,
    forgetting_lines,
    fwt_words,
    routing_caption,
    routing_label,
    speakers_per_task,
)


def eda_table(summary: dict) -> Table:
    table = Table(title=f"EDA (token lengths: {summary['tokenizer']})")
    for col in ("dataset", "utterances", "speakers (share)", "mean chars", "mean tokens", f"≤ {summary['max_len']} tok",
                "vocab"):
        table.add_column(col)
    for d in summary["datasets"]:
        shares = ", ".join(f"{s} {100 * v:.0f}%{' ⚠' if s in d['dominant_speakers'] else ''}"
                           for s, v in d["speaker_share"].items())
        table.add_row(d["name"], str(d["utterances"]), shares, str(d["chars"]["mean"]), str(d["tokens"]["mean"]),
                      f"{100 * d['tokens']['share_within_max_len']:.1f}%", str(d["vocabulary_total"]))
    return table


def ppl_table(metrics: RunMetrics, rows: RunMetrics | AgnosticRows | None = None, routing: str = "") -> Table:
    """The perplexity matrix (`rows`: the run's own unless given), titled with how it was routed."""
    rows = metrics if rows is None else rows
    title = f"Test perplexity — {metrics.run} ({metrics.strategy})"
    caption = "lower is better" + (f"; {routing_label(routing)}" if routing else "")
    table = Table(title=title, caption=caption, min_width=max(len(title), len(caption)) + 4)
    table.add_column("after phase ↓ / evaluated on →")
    for name in metrics.tasks:
        table.add_column(name, justify="right")
    for i, row in enumerate(rows.ppl):
        table.add_row("before training" if i == 0 else f"{i}: {metrics.tasks[i - 1]}", *(f"{v:.2f}" for v in row))
    return table


def summary_lines(metrics: RunMetrics) -> list[str]:
    """The closing summary's sentences: what each figure is and whether it is good, for the rows the run is
    scored by (speaker-routed when its matrix needed the task id)."""
    rows, routing = metrics.scored()
    lines = [f"Scored by: {routing_label(routing)}. {routing_caption(metrics, routing)}"]
    final = final_ppl_words(rows, metrics.tasks)
    if final:
        lines.append(final)
    forgetting = forgetting_lines(metrics.tasks, rows)
    if forgetting:
        lines.append("Forgetting (test PPL at the end vs right after learning the task):")
        lines += [f"  {line}" for line in forgetting]
        for words, meaning in ((bwt_words(rows.bwt), BWT_MEANING), (fwt_words(rows.fwt), FWT_MEANING)):
            if words:
                lines += [words, f"  {meaning}"]
    if routing == "agnostic" and metrics.forgetting_pct:
        lines.append(f"With the task id given ({routing_label('oracle')}, which users do not have): "
                     + "; ".join(forgetting_lines(metrics.tasks, metrics)) + ".")
    if rows.speaker_attribution:
        attribution = attribution_words(metrics.tasks, rows.speaker_attribution[-1], speakers_per_task(metrics))
        if attribution:
            lines.append(attribution)
    return lines


def print_summary(console, metrics: RunMetrics) -> None:
    rows, routing = metrics.scored()
    console.print(ppl_table(metrics, rows, routing))
    for line in summary_lines(metrics):
        console.print(line, markup=False, highlight=False)
