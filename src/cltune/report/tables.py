"""Rich tables for the terminal, built from EDA summaries and run metrics."""

from __future__ import annotations

from rich.table import Table

from cltune.evaluation.results import AgnosticRows, RunMetrics
from cltune.report.words import routing_label, run_summary


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
    """The closing summary's sentences (`words.run_summary`), as terminal lines."""
    said = run_summary(metrics)
    lines = [f"Scored by: {said.scored_by}. {said.caption}", *([said.final] if said.final else [])]
    if said.forgetting:
        lines.append("Forgetting (test PPL at the end vs right after learning the task):")
        lines += [f"  {line}" for line in said.forgetting]
        for words, meaning in said.transfer:
            lines += [words, f"  {meaning}"]
    return lines + [line for line in (said.with_task_id, said.attribution) if line]


def print_summary(console, metrics: RunMetrics) -> None:
    rows, routing = metrics.scored()
    console.print(ppl_table(metrics, rows, routing))
    for line in summary_lines(metrics):
        console.print(line, markup=False, highlight=False)
    if metrics.stages_s:
        console.print(stages_line(metrics.stages_s), markup=False, highlight=False)


def stages_line(stages: dict[str, float]) -> str:
    """Where the run's time went: `time: 212 s — train 160 s (75%), evaluate 31 s (15%), …`, largest first."""
    total = sum(stages.values())
    spent = sorted(((s, name) for name, s in stages.items() if s >= 0.05), reverse=True)
    return f"time: {total:.0f} s — " + ", ".join(
        f"{name} {s:.1f} s ({100 * s / total:.0f}%)" if total else f"{name} {s:.1f} s" for s, name in spent)
