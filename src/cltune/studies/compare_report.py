"""compare.json → compare.md, compare.csv, a self-contained compare.html and the trade-off plot.

Only what the intervals support is called a difference: a paired change whose 95% interval
excludes zero is "resolved"; everything else is reported as within the noise of this test set.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from cltune.storage.files import atomic_write_text


def _ci(entry: dict, digits: int = 1, suffix: str = "") -> str:
    if entry is None or entry.get("mean") is None:
        return "–"
    mean = f"{entry['mean']:.{digits}f}{suffix}"
    if entry.get("low") is None:
        return mean
    return f"{mean} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _label(name: str, entry: dict) -> str:
    return f"{name} (agnostic)" if entry["routing"] == "agnostic" else name


def reading(summary: dict) -> list[str]:
    """Sentences that claim only what the intervals support."""
    lines, unresolved = [], 0
    for name, entry in summary["strategies"].items():
        for task, change in (entry.get("vs_naive") or {}).items():
            if not change["resolved"]:
                unresolved += 1
                continue
            word = "higher" if change["change_pct"] > 0 else "lower"
            lines.append(f"- **{name}** leaves {task}'s final test perplexity {abs(change['change_pct']):.1f}% {word} "
                         f"than naive (95% interval {change['low_pct']:+.1f}% to {change['high_pct']:+.1f}%).")
    if not lines:
        lines.append("- No strategy's final perplexity on any task differs from naive's beyond the noise of these "
                     "test sets (every paired 95% interval includes 0).")
    elif unresolved:
        lines.append(f"- The other {unresolved} strategy × task differences are within the noise "
                     "(intervals include 0).")
    guarded = [f"{name} seed {seed} phase {phase} ({times}×)" for name, entry in summary["strategies"].items()
               for seed, phase, times in entry.get("guard_backoffs", [])]
    if guarded:
        lines.append(f"- The loss guard backed off (a rising training loss: the weights taken back, the learning "
                     f"rates halved) in {', '.join(guarded)}: those phases trained less than the others.")
    if len(summary["seeds"]) == 1:
        lines.append("- Only 1 seed: the paired intervals hold the test set's noise alone, not the runs' training "
                     "noise (two runs of one config can part by more); use 3 or more seeds.")
    elif len(summary["seeds"]) < 3:
        lines.append(f"- Only {len(summary['seeds'])} seeds: the intervals over seeds are wide; use 3 or more.")
    return lines


def markdown(summary: dict, command: str) -> str:
    tasks, strategies = summary["tasks"], summary["strategies"]
    reference = summary["reference"]
    sizes = strategies[reference]["test_sizes"]
    lines = [
        "# Strategy comparison", "", f"`{command}`", "",
        f"Seeds {', '.join(map(str, summary['seeds']))} (each reseeds the split, sampling and initialization). "
        "Test utterances per task and seed: " + "; ".join(
            f"seed {s}: " + ", ".join(f"{t} {n}" for t, n in zip(tasks, row))
            for s, row in zip(summary["seeds"], sizes))
        + ".", "",
        "Cells are mean [95% t-interval over seeds]. Strategies marked *agnostic* route by speaker token (their "
        "oracle-task-id matrix is in each run's metrics.json); all others use one model for every task.", "",
        "## Final test perplexity", "",
    ]
    lines += _table(["strategy", *tasks],
                    [[_label(n, e), *(_ci(v) for v in e["final_ppl"])] for n, e in strategies.items()])
    earlier = tasks[:-1]
    lines += ["", "## Forgetting (% perplexity rise of earlier tasks)", "",
              "Final: the end vs right after learning. Peak: the worst rise over any later phase. "
              "BWT/FWT in ln-PPL.", ""]
    lines += _table(["strategy", *(f"{t} final" for t in earlier), *(f"{t} peak" for t in earlier), "BWT", "FWT"],
                    [[_label(n, e), *(_ci(v, suffix="%") for v in e["forgetting_pct"]),
                      *(_ci(v, suffix="%") for v in e["peak_forgetting_pct"]), _ci(e["bwt"], 4), _ci(e["fwt"], 4)]
                     for n, e in strategies.items()])
    lines += ["", "## Against naive, paired on the same test utterances", "",
              f"Per cent change of the final test perplexity against naive (same seed, same utterances), averaged over "
              f"seeds, with a 95% interval, the wider of a t-interval over the seeds' paired changes (each seed is "
              f"one training run of each side: their spread holds the runs' training noise) and "
              f"{summary['bootstrap']} two-level bootstrap draws (seeds, then test utterances: test-set noise). "
              "**Bold**: the interval excludes 0. "
              "New-task ratio: the last task's perplexity over naive's, by seed.", ""]
    rows = []
    for name, entry in strategies.items():
        if name == reference:
            continue
        cells = []
        for task in tasks:
            c = entry["vs_naive"][task]
            text = f"{c['change_pct']:+.1f}% [{c['low_pct']:+.1f}, {c['high_pct']:+.1f}]"
            cells.append(f"**{text}**" if c["resolved"] else text)
        rows.append([_label(name, entry), *cells, _ci(entry["new_task_ratio"], 3), _ci(entry["attribution"], 3)])
    lines += _table(["strategy", *tasks, "new-task ratio", "attribution"], rows) if rows else ["(naive only)"]
    lines += ["", "## Costs", ""]
    lines += ["Wall s: training and strategy hooks, not evaluation. Forward / backward × naive: token positions "
              "through the model outside evaluation (training, teachers, reference gradients, Fisher, meta-training), "
              "and those with a backward pass, over naive's on the same seed; generation (gen_replay) is not a pass "
              "here, its time is in wall s. Trained per phase: the parameters one phase trains; adapter parameters: "
              "all the final model keeps (per-task adapters keep one set per task). Utterances kept: earlier training "
              "utterances the last phase could replay or project against.", ""]
    lines += _table(["strategy", "wall s", "target tokens trained", "forward × naive", "backward × naive",
                     "peak RSS MB", "trained per phase", "adapter params", "utterances kept"],
                    [[_label(n, e), _ci(e["wall_s"], 0), _ci(e["target_tokens"], 0),
                      _ci(e.get("forward_vs_naive", {}), 2), _ci(e.get("backward_vs_naive", {}), 2),
                      _ci(e["peak_rss_mb"], 0),
                      f"{e['trainable']:,}", "–" if e.get("adapter_params") is None else f"{e['adapter_params']:,}",
                      str(e["stored_utterances"])] for n, e in strategies.items()])
    lines += ["", "## Reading", "", *reading(summary), "", "![forgetting vs plasticity](compare.png)", ""]
    return "\n".join(lines)


def csv_text(summary: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["strategy", "routing", "metric", "task", "mean", "low", "high"])
    for name, entry in summary["strategies"].items():
        for metric in ("final_ppl", "forgetting_pct", "peak_forgetting_pct"):
            for task, v in zip(summary["tasks"], entry[metric]):
                writer.writerow([name, entry["routing"], metric, task, v["mean"], v["low"], v["high"]])
        for metric in ("bwt", "fwt", "new_task_ratio", "attribution", "wall_s", "target_tokens", "forward_vs_naive",
                       "backward_vs_naive", "peak_rss_mb"):
            v = entry.get(metric) or {"mean": None, "low": None, "high": None}
            writer.writerow([name, entry["routing"], metric, "", v["mean"], v["low"], v["high"]])
        for task, c in (entry.get("vs_naive") or {}).items():
            writer.writerow([name, entry["routing"], "change_vs_naive_pct", task, c["change_pct"], c["low_pct"],
                             c["high_pct"]])
    return buffer.getvalue()


def plot(summary: dict, path: Path) -> Path:
    """Peak forgetting of the first task vs the new task's perplexity relative to naive, with t-intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, entry in summary["strategies"].items():
        x, y = (entry["peak_forgetting_pct"] or [{"mean": 0.0}])[0], entry["new_task_ratio"]
        if x["mean"] is None or y["mean"] is None:
            continue
        xerr = [[x["mean"] - x["low"]], [x["high"] - x["mean"]]] if x.get("low") is not None else None
        yerr = [[y["mean"] - y["low"]], [y["high"] - y["mean"]]] if y.get("low") is not None else None
        ax.errorbar(x["mean"], y["mean"], xerr=xerr, yerr=yerr, fmt="o", capsize=3)
        ax.annotate(_label(name, entry), (x["mean"], y["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel(f"peak forgetting of {summary['tasks'][0]} (%)")
    ax.set_ylabel("new-task PPL / naive's")
    ax.set_title("forgetting vs plasticity (mean, 95% t-interval over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(summary: dict, out: Path, command: str) -> Path:
    """compare.json (the data), then the views made from it alone."""
    from cltune.report.write import html_page

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(summary, indent=1) + "\n")
    plot(summary, out / "compare.png")
    text = markdown(summary, command)
    atomic_write_text(out / "compare.md", text)
    atomic_write_text(out / "compare.csv", csv_text(summary))
    atomic_write_text(out / "compare.html", html_page(text, out, "cltune compare"))
    return out / "compare.md"
