"""Matplotlib figures of a run, each from plain data (metrics dict, train-log rows)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def loss_curves(logs: dict[int, list[dict]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    offset = 0
    for phase, rows in sorted(logs.items()):
        steps = [r for r in rows if "loss" in r]
        vals = [r for r in rows if "val_loss" in r]
        if steps:
            ax.plot([offset + r["step"] for r in steps], [r["loss"] for r in steps], label=f"phase {phase} train")
        if vals:
            ax.plot([offset + r["step"] for r in vals], [r["val_loss"] for r in vals], "o--", label=f"phase {phase} val")
        offset += max((r["step"] for r in rows), default=0)
    ax.set_xlabel("optimizer step (cumulative)")
    ax.set_ylabel("mean token NLL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def ppl_heatmap(ppl: list[list[float]], tasks: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(tasks), 0.9 + 0.6 * len(ppl)))
    im = ax.imshow(ppl, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(ppl)), ["before"] + [f"after phase {i}" for i in range(1, len(ppl))])
    for i, row in enumerate(ppl):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white", fontsize=9)
    fig.colorbar(im, ax=ax, label="test PPL")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def forgetting_bars(values: list[float], tasks: list[str], path: Path) -> Path:
    names = tasks[: len(values)]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * max(1, len(values)), 3))
    ax.bar(names, values, color=["#c44e52" if v > 0 else "#55a868" for v in values])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("forgetting (% PPL rise)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
