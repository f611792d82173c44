"""report.md and a self-contained report.html (images embedded) from a run folder's data files."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from cltune.errors import UserError
from cltune.files import atomic_write_text, read_json, writable_folder
from cltune.report.plots import forgetting_bars, loss_curves, ppl_heatmap
from cltune.results import RunMetrics
from cltune.verified import verify


def _read_logs(run_dir: Path) -> dict[int, list[dict]]:
    """Each phase checkpoint's training log, read only once its folder matches its manifest."""
    logs = {}
    for folder in sorted(run_dir.glob("phase*")):
        path = folder / "train_log.jsonl"
        if folder.is_dir() and path.exists() and folder.name[5:].isdigit():
            verify(folder)
            logs[int(folder.name[5:])] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return logs


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _hooks(strategy: dict) -> str:
    """The strategy's own work around a phase (e.g. Fisher, sampling, meta-training), in seconds."""
    hooks = strategy.get("hooks_s")  # absent in runs written before it was recorded
    return f"{hooks['before_task']:.1f} / {hooks['after_task']:.1f}" if hooks else "–"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out


def render_markdown(run_dir: Path, metrics: RunMetrics, images: dict[str, str], eda: dict | None = None) -> str:
    tasks = metrics.tasks
    lines = [f"# cltune report — {metrics.run}", "",
             f"Strategy **{metrics.strategy}** on model `{metrics.model}` ({metrics.precision} training, "
             f"{metrics.eval_precision} evaluation, {metrics.processes} process(es)). Trainable: {metrics.parameters['lora']:,} LoRA + "
             f"{metrics.parameters['new_token_rows']:,} new-token parameters.", ""]
    if eda is not None:
        lines += ["## Data", ""] + _table(
            ["dataset", "utterances", "speakers", "mean tokens", f"≤ {eda['max_len']} tokens", "vocabulary"],
            [[d["name"], d["utterances"], ", ".join(f"{s} ({100 * v:.0f}%)" for s, v in d["speaker_share"].items()),
              d["tokens"]["mean"], f"{100 * d['tokens']['share_within_max_len']:.1f}%", d["vocabulary_total"]]
             for d in eda["datasets"]]) + ["", "Full EDA: [eda/eda.md](eda/eda.md)", ""]
    if metrics.ppl:
        oracle = metrics.routing == "oracle"
        lines += ["## Test perplexity matrix" + (" (oracle task id)" if oracle else ""), "",
                  "Row = after phase i (row 0 before training), column = dataset."
                  + (" Each dataset is evaluated with its own adapter: the task id is given, which a user of the "
                     "saved model does not have; the agnostic matrix below is what they get." if oracle else ""), ""]
        lines += _table(["after"] + tasks, [["before" if i == 0 else f"phase {i}"] + r for i, r in enumerate(metrics.ppl)])
        lines += ["", f"![perplexity matrix]({images['heatmap']})", ""]
    if metrics.agnostic is not None and metrics.agnostic.ppl:
        agnostic = metrics.agnostic
        lines += ["## Test perplexity matrix (agnostic: routed by speaker token)", "",
                  "Each test utterance is served by the adapter its speaker token routes to (the latest task with "
                  "that speaker), as `cltune generate` does.", ""]
        lines += _table(["after"] + tasks, [["before" if i == 0 else f"phase {i}"] + r for i, r in enumerate(agnostic.ppl)])
        if agnostic.forgetting_pct:
            lines += ["", "Forgetting, agnostic: " + ", ".join(
                f"{t} final {f:+.2f}% / peak {p:+.2f}%" for t, f, p in
                zip(tasks, agnostic.forgetting_pct, agnostic.peak_forgetting_pct or agnostic.forgetting_pct))]
        lines.append("")
    if metrics.forgetting_pct:
        peak = metrics.peak_forgetting_pct or [None] * len(metrics.forgetting_pct)
        lines += ["## Forgetting", "", "Final: the end vs right after learning; peak: the worst rise over any later phase.",
                  ""] + _table(["dataset", "final forgetting %", "peak forgetting %"],
                               [[t, f"{f:+.2f}%", None if p is None else f"{p:+.2f}%"]
                                for t, f, p in zip(tasks, metrics.forgetting_pct, peak)])
        lines += ["", f"Max forgetting {metrics.max_forgetting_pct:+.2f}% · BWT {metrics.bwt:+.4f} · FWT {metrics.fwt:+.4f} "
                  f"(log-PPL) · average final PPL {metrics.avg_final_ppl:.2f}", "", f"![forgetting]({images['forgetting']})", ""]
    if metrics.speaker_attribution:
        lines += ["## Speaker attribution", "", "Share of test utterances most likely under their true speaker token.", ""]
        lines += _table(["after"] + tasks, [["before" if i == 0 else f"phase {i}"] + [None if v is None else round(100 * v, 1) for v in r]
                                             for i, r in enumerate(metrics.speaker_attribution)])
        lines.append("")
    if metrics.phases:
        lines += ["## Training", ""] + _table(
            ["phase", "dataset", "steps", "target tokens", "wall s", "tokens/s", "best val loss",
             "strategy before / after phase s"],
            [[p.phase, p.task, p.steps, p.target_tokens, p.wall_s, p.tokens_per_s, p.best_val_loss, _hooks(p.strategy)]
             for p in metrics.phases]) + ["", f"![loss curves]({images['loss']})", ""]
    alone = [s for s in metrics.samples if not s.context]
    if alone:
        lines += ["## Sample generations", ""] + _table(
            ["phase", "speaker", "text"], [[s.phase, f"{s.speaker} `{s.token}`", _cell(s.text)] for s in alone])
        lines.append("")
    replies = [s for s in metrics.samples if s.context]
    if replies:
        lines += ["## Replies in context", "", f"The model's reply to real test-split contexts (the last "
                  f"{metrics.context_turns} turns), beside the true reply.", ""] + _table(
            ["phase", "context", "speaker", "model's reply", "true reply"],
            [[s.phase, " / ".join(f"{_cell(who, 40)}: {_cell(text, 80)}" for who, text in s.context), f"{s.speaker} `{s.token}`",
              _cell(s.text), _cell(s.reference or "")] for s in replies])
        lines.append("")
    config = run_dir / "config.resolved.yaml"
    if config.exists():
        lines += ["## Resolved config", "", "```yaml", config.read_text(encoding="utf-8").rstrip(), "```", ""]
    return "\n".join(lines)


def _cell(text: str, limit: int = 160) -> str:
    """Text for one Markdown table cell: one line, no column breaks, at most `limit` characters."""
    return text.replace("|", "\\|").replace("\n", " ")[:limit]


def html_page(markdown: str, folder: Path, title: str = "cltune report") -> str:
    """A small Markdown → HTML rendering (tables, headings, images from `folder` inlined as base64, code)."""
    out, in_code, in_table = [], False, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if set(line) <= set("|-"):
                continue
            tag = "th" if not in_table else "td"
            out.append(("<table>" if not in_table else "") + "<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            in_table = True
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        image = re.fullmatch(r"!\[(.*)\]\((.*)\)", line)
        if image:
            data = base64.b64encode((folder / image.group(2)).read_bytes()).decode()
            out.append(f'<img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line.lstrip('# '))}</h{level}>")
        elif line:
            out.append(f"<p>{_inline(line)}</p>")
    if in_table:
        out.append("</table>")
    style = "body{font-family:sans-serif;max-width:960px;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"`(.+?)`", r"<code>\1</code>", text)
    return re.sub(r"\[(.+?)\]\((.+?)\)", r'<a href="\2">\1</a>', text)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").exists():
        raise UserError(f"{run_dir}: no metrics.json; point at a run folder (e.g. checkpoints/demo)")
    metrics = RunMetrics.read(run_dir / "metrics.json")
    logs = _read_logs(run_dir)
    eda_path = run_dir / "eda" / "eda.json"
    eda = read_json(eda_path) if eda_path.exists() else None  # everything read (or refused) before anything is written
    writable_folder(run_dir, "report")
    assets = run_dir / "report_assets"
    assets.mkdir(exist_ok=True)
    images = {"loss": "report_assets/loss.png", "heatmap": "report_assets/ppl.png", "forgetting": "report_assets/forgetting.png"}
    loss_curves(logs, run_dir / images["loss"])
    if metrics.ppl:
        ppl_heatmap(metrics.ppl, metrics.tasks, run_dir / images["heatmap"])
    if metrics.forgetting_pct:
        forgetting_bars(metrics.forgetting_pct, metrics.tasks, run_dir / images["forgetting"])
    markdown = render_markdown(run_dir, metrics, images, eda)
    atomic_write_text(run_dir / "report.md", markdown)
    atomic_write_text(run_dir / "report.html", html_page(markdown, run_dir))
    return run_dir / "report.md", run_dir / "report.html"
