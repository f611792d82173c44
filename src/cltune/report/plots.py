"""Matplotlib figures of a run, each from plain data (metrics dict, train-log rows)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from cltune.report.words import UNCHANGED_PCT

WORSE, BETTER = "#c44e52", "#55a868"


def loss_curves(logs: dict[int, list[dict]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    offset = 0
    for phase, rows in sorted(logs.items()):
        steps = [r for r in rows if "loss" in r]
        vals = [r for r in rows if "val_loss" in r]
        if steps:
            ax.plot([offset + r["step"] for r in steps], [r["loss"] for r in steps], label=f"phase {phase} train")
        if vals:
            ax.plot([offset + r["step"] for r in vals], [r["val_loss"] for r in vals], "o--",
                    label=f"phase {phase} val")
        offset += max((r["step"] for r in rows), default=0)
    ax.set_xlabel("optimizer step (cumulative)")
    ax.set_ylabel("mean token NLL (lower is better)")
    if ax.lines:
        ax.legend(fontsize=8)
    return save(fig, path)


def save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def heatmap_figure(ppl: list[list[float]], tasks: list[str], title: str = "") -> Figure:
    """The perplexity matrix: rows after each phase, columns the dataset evaluated on; a log colour scale
    (ratios, as BWT/FWT), darker = higher perplexity = worse, said on the colorbar."""
    fig, ax = plt.subplots(figsize=(3.4 + 1.4 * len(tasks), 1.5 + 0.6 * len(ppl)))
    values = [v for row in ppl for v in row]
    low, high = min(values), max(values)
    norm = LogNorm(vmin=low, vmax=high) if low < high else None
    im = ax.imshow(ppl, cmap="viridis_r", norm=norm, aspect="auto")  # viridis reversed: high = dark
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(ppl)), ["before training"] + [f"{i}: {tasks[i - 1]}" if i <= len(tasks) else str(i)
                                                          for i in range(1, len(ppl))])
    ax.set_xlabel("evaluated on (test split)")
    ax.set_ylabel("after phase (task learned)")
    for i, row in enumerate(ppl):
        for j, v in enumerate(row):
            dark = norm is None or norm(v) > 0.5
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white" if dark else "black", fontsize=9)
    bar = fig.colorbar(im, ax=ax)
    bar.set_label("test perplexity (log scale)\nlower is better: darker = worse")
    bar.ax.minorticks_off()
    ticks = [low, (low * high) ** 0.5, high] if norm is not None else [low]
    bar.set_ticks(ticks, labels=[f"{ticks[0]:.3g} better", *(f"{t:.3g}" for t in ticks[1:-1]),
                                 f"{ticks[-1]:.3g} worse"] if len(ticks) > 1 else [f"{low:.3g}"])
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def ppl_heatmap(ppl: list[list[float]], tasks: list[str], path: Path, title: str = "") -> Path:
    return save(heatmap_figure(ppl, tasks, title), path)


def lines_figure(ppl: list[list[float]], tasks: list[str], title: str = "") -> Figure:
    """Each task's test perplexity over the phases (x: after phase i, 0 = before training; log y): a line
    per task, a filled marker where the task is learned, open markers before."""
    fig, ax = plt.subplots(figsize=(4.5 + 0.5 * len(ppl), 3.6))
    phases = list(range(len(ppl)))
    for j, task in enumerate(tasks):
        values = [row[j] for row in ppl]
        (line,) = ax.plot(phases, values, "-", label=task)
        learned = j + 1 if j + 1 < len(ppl) else None
        ax.plot(phases[: learned or len(ppl)], values[: learned or len(ppl)], "o", mfc="none", color=line.get_color())
        if learned is not None:
            ax.plot(phases[learned:], values[learned:], "o", color=line.get_color())
            ax.plot([learned], [values[learned]], "*", markersize=12, color=line.get_color())
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 300, not 3×10²
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xticks(phases, ["before"] + [f"{i}: {tasks[i - 1]}" for i in range(1, len(ppl))],
                  rotation=30 if len(ppl) > 4 else 0, ha="right" if len(ppl) > 4 else "center")
    ax.set_xlabel("after phase (task learned)")
    ax.set_ylabel("test perplexity (log scale)\nlower is better")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              title="★ learned; open: not yet", title_fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def ppl_lines(ppl: list[list[float]], tasks: list[str], path: Path, title: str = "") -> Path:
    return save(lines_figure(ppl, tasks, title), path)


def forgetting_figure(values: list[float], tasks: list[str], routing: str = "") -> Figure:
    """Each earlier task's perplexity change from right after learning it to the end (%): up and red is worse."""
    names = tasks[: len(values)]
    fig, ax = plt.subplots(figsize=(3.4 + 1.0 * max(1, len(values)), 3.4))
    colors = [WORSE if v >= UNCHANGED_PCT else BETTER if v <= -UNCHANGED_PCT else "#999999" for v in values]
    bars = ax.bar(names, values, color=colors, width=0.5)
    ax.bar_label(bars, [f"{v:+.1f}%" for v in values], fontsize=8, padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    low, high = min(0.0, *values), max(0.0, *values)
    span = max(high - low, 1.0)
    ax.set_ylim(low - 0.25 * span, high + 0.25 * span)
    ax.set_xlim(-0.5 - 0.3 * (len(values) == 1), len(values) - 0.5 + 0.3 * (len(values) == 1))
    ax.set_ylabel("test PPL change since learned (%)")
    ax.legend(handles=[Patch(color=WORSE, label="up: worse (forgetting)"),
                       Patch(color=BETTER, label="down: better (later tasks helped)")],
              fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, frameon=False)
    ax.set_title("forgetting: end vs right after learning" + (f"\n{routing}" if routing else ""), fontsize=9)
    return fig


def forgetting_bars(values: list[float], tasks: list[str], path: Path, routing: str = "") -> Path:
    return save(forgetting_figure(values, tasks, routing), path)


def tradeoff_scatter(points: list[dict], path: Path, title: str = "", xlabel: str = "forgetting of task 1 (%)") -> Path:
    """Forgetting (x) vs new-task PPL (y); each point a dict with label, forgetting, new_ppl."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in points:
        ax.scatter(p["forgetting"], p["new_ppl"])
    fig.canvas.draw()  # fixes the axis limits, so label positions can be compared in points
    placed: list[tuple[float, float]] = []
    for p in points:
        x, y = ax.transData.transform((p["forgetting"], p["new_ppl"])) * 72 / fig.dpi
        # the first offset whose label does not sit on an earlier one (labels ~9 pt tall, ~50 pt wide)
        dy = next((d for d in (3, -10, 12, -19, 21, -28, 30) if all(abs(x - px) > 50 or abs(y + d - py) > 8
                                                                    for px, py in placed)), 3)
        placed.append((x, y + dy))
        ax.annotate(p["label"], (p["forgetting"], p["new_ppl"]), fontsize=7, xytext=(3, dy), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("new-task test PPL (plasticity; lower is better)")
    if title:
        ax.set_title(title)
    return save(fig, path)
