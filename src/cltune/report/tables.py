"""Rich tables for the terminal, built from EDA summaries and run metrics."""

from __future__ import annotations

from rich.table import Table

from cltune.results import RunMetrics


def eda_table(summary: dict) -> Table:
    table = Table(title=f"EDA (token lengths: {summary['tokenizer']})")
    for col in ("dataset", "utterances", "speakers (share)", "mean chars", "mean tokens", f"≤ {summary['max_len']} tok", "vocab"):
        table.add_column(col)
    for d in summary["datasets"]:
        shares = ", ".join(f"{s} {100 * v:.0f}%{' ⚠' if s in d['dominant_speakers'] else ''}" for s, v in d["speaker_share"].items())
        table.add_row(d["name"], str(d["utterances"]), shares, str(d["chars"]["mean"]), str(d["tokens"]["mean"]),
                      f"{100 * d['tokens']['share_within_max_len']:.1f}%", str(d["vocabulary_total"]))
    return table


def ppl_table(metrics: RunMetrics) -> Table:
    table = Table(title=f"Test perplexity — {metrics.run} ({metrics.strategy})")
    table.add_column("after")
    for name in metrics.tasks:
        table.add_column(name, justify="right")
    for i, row in enumerate(metrics.ppl):
        table.add_row("no training" if i == 0 else f"phase {i}", *(f"{v:.2f}" for v in row))
    return table


def print_summary(console, metrics: RunMetrics) -> None:
    console.print(ppl_table(metrics))
    if metrics.forgetting_pct:
        peak = metrics.peak_forgetting_pct or metrics.forgetting_pct
        parts = ", ".join(f"{t} {f:+.1f}% (peak {p:+.1f}%)" for t, f, p in zip(metrics.tasks, metrics.forgetting_pct, peak))
        console.print(f"forgetting, final vs just learned: {parts}; BWT {metrics.bwt:+.4f}, FWT {metrics.fwt:+.4f} (log-PPL)"
                      + (" — oracle task id" if metrics.routing == "oracle" else ""))
        if metrics.agnostic is not None and metrics.agnostic.forgetting_pct:
            parts = ", ".join(f"{t} {f:+.1f}%" for t, f in zip(metrics.tasks, metrics.agnostic.forgetting_pct))
            console.print(f"forgetting routed by speaker token alone (agnostic): {parts}")
