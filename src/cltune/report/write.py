"""report.md and a self-contained report.html (images embedded) from a run folder's data files."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from urllib.parse import unquote

import yaml
from markdown_it import MarkdownIt

from cltune.config import BaseRunConfig
from cltune.errors import UserError
from cltune.evaluation.results import RunMetrics
from cltune.report.plots import forgetting_bars, loss_curves, ppl_heatmap, ppl_lines
from cltune.report.words import (
    FORGETTING_MEANING,
    chance_words,
    change_words,
    routing_caption,
    routing_label,
    run_summary,
    speakers_per_task,
)
from cltune.storage.files import atomic_write_text, read_json, writable_folder
from cltune.storage.verified import phase_folders, verify

RESOLVED = "config.resolved.yaml"
# the router each phase checkpoint saved (cltune.strategies.routing reads it; written by the pipeline)
ROUTER = "router.json"
IMAGES = {"loss": "report_assets/loss.png", "heatmap": "report_assets/ppl.png",
          "heatmap_agnostic": "report_assets/ppl_agnostic.png", "forgetting": "report_assets/forgetting.png",
          "lines": "report_assets/ppl_lines.png"}


def _read_phases(run_dir: Path) -> tuple[dict[int, list[dict]], dict | None]:
    """Each phase checkpoint's training log, and the last one's router table, read only once each folder
    matches its manifest."""
    logs, router = {}, None
    for folder in phase_folders(run_dir):
        path = folder / "train_log.jsonl"
        if path.exists():
            verify(folder)
            logs[int(folder.name[5:])] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                                          if line]
            router = read_json(folder / ROUTER) if (folder / ROUTER).exists() else None
    return logs, router


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


def _phase_label(i: int, tasks: list[str]) -> str:
    return "before training" if i == 0 else f"{i}: {tasks[i - 1]}"


def _matrix(tasks: list[str], rows: list[list[float]]) -> list[str]:
    return _table(["after phase"] + [f"evaluated on {t}" for t in tasks],
                  [[_phase_label(i, tasks)] + r for i, r in enumerate(rows)])


MATRIX_READING = ("Row: after phase i, the task it learned (first row: the untrained model); column: the dataset "
                  "evaluated on. Lower is better; in the heatmap darker is worse (see its colour bar).")


def render_markdown(run_dir: Path, metrics: RunMetrics, images: dict[str, str], eda: dict | None = None,
                    router: dict | None = None) -> str:
    """The report's Markdown: what the numbers say first, then the matrices and figures they come from.
    `router`: the last checkpoint's router.json, which names how speakers were routed."""
    lines = [f"# cltune report — {metrics.run}", "",
             f"Strategy **{metrics.strategy}** on model `{metrics.model}` ({metrics.precision} training, "
             f"{metrics.eval_precision} evaluation, {metrics.processes} process(es)). "
             f"Trainable: {metrics.parameters['lora']:,} LoRA + "
             f"{metrics.parameters['new_token_rows']:,} new-token parameters.", ""]
    lines += _summary(metrics, eda, router)
    lines += _matrices(metrics, images, router)
    lines += _forgetting(metrics, images)
    lines += _attribution(metrics, eda)
    lines += _data(eda)
    lines += _training(metrics, images)
    lines += _samples(metrics)
    lines += _config(run_dir, metrics)
    return "\n".join(lines)


def _summary(metrics: RunMetrics, eda: dict | None, router: dict | None) -> list[str]:
    """`words.run_summary` as the report's first section."""
    if not metrics.scored()[0].ppl:
        return []
    said = run_summary(metrics, eda, router)
    lines = ["## What the numbers say", "", f"Scored by **{said.scored_by}**. {said.caption}", "",
             f"- {said.final}"]
    if said.forgetting:
        lines.append("- **Forgetting** (test PPL at the end vs right after learning the task):")
        lines += [f"  - {line}" for line in said.forgetting]
        lines += [f"- {words} {meaning}" for words, meaning in said.transfer]
    lines += [f"- {line}" for line in (said.with_task_id, said.attribution) if line]
    return lines + [""]


def _matrices(metrics: RunMetrics, images: dict[str, str], router: dict | None) -> list[str]:
    lines = []
    if metrics.ppl:
        oracle = metrics.routing == "oracle"
        lines += ["## Test perplexity matrix" + (f" ({routing_label('oracle')})" if oracle else ""), "",
                  f"{MATRIX_READING} {routing_caption(metrics, metrics.routing, router)}", ""]
        lines += _matrix(metrics.tasks, metrics.ppl) + ["", f"![perplexity matrix]({images['heatmap']})", ""]
        if len(metrics.ppl) > 2:  # a line per task over the phases: where each is learned, how it moves after
            lines += [f"![each task's perplexity over the phases]({images['lines']})", ""]
    if metrics.agnostic is not None and metrics.agnostic.ppl:
        lines += ["## Test perplexity matrix (agnostic: routed by speaker token)", "",
                  f"{MATRIX_READING} {routing_caption(metrics, 'agnostic', router)}", ""]
        lines += _matrix(metrics.tasks, metrics.agnostic.ppl)
        lines += ["", f"![perplexity matrix, routed by speaker token]({images['heatmap_agnostic']})", ""]
    return lines


def _forgetting(metrics: RunMetrics, images: dict[str, str]) -> list[str]:
    rows, routing = metrics.scored()
    if not rows.forgetting_pct:
        return []
    label = routing_label(routing)
    peak = rows.peak_forgetting_pct or rows.forgetting_pct
    lines = [f"## Forgetting ({label})", "",
             f"Computed from the matrix this run is scored by ({label}). {FORGETTING_MEANING} Final: the end vs right "
             "after learning; peak: the worst change over any later phase.", ""]
    lines += _table(["dataset", "final change of test PPL", "peak change", "verdict"],
                    [[t, f"{f:+.2f}%", f"{p:+.2f}%", change_words(f)]
                     for t, f, p in zip(metrics.tasks, rows.forgetting_pct, peak)])
    lines += ["", f"Max forgetting {rows.max_forgetting_pct:+.2f}% · BWT {_signed(rows.bwt)} · "
              f"FWT {_signed(rows.fwt)} (log-PPL; read as in the summary above) · average final PPL "
              f"{rows.avg_final_ppl:.2f} (lower is better)."]
    if routing == "agnostic" and metrics.forgetting_pct:
        lines += ["", f"With the task id given ({routing_label('oracle')}): "
                  + ", ".join(f"{t} final {f:+.2f}%" for t, f in zip(metrics.tasks, metrics.forgetting_pct))
                  + "; users of the saved model do not have it."]
    return lines + ["", f"![forgetting, {label}]({images['forgetting']})", ""]


def _signed(v: float | None) -> str:
    return "–" if v is None else f"{v:+.4f}"


def _attribution(metrics: RunMetrics, eda: dict | None) -> list[str]:
    rows, routing = metrics.scored()
    if not rows.speaker_attribution:
        return []
    speakers = speakers_per_task(metrics, eda)
    lines = [f"## Speaker attribution ({routing_label(routing)})", "",
             "Share of test utterances whose text is most likely after their true speaker's token, among the dataset's "
             "speakers: higher is better; a random pick of a speaker scores chance ("
             + ", ".join(f"{t}: {chance_words(speakers.get(t))}" for t in metrics.tasks) + ").", ""]
    lines += _table(["after phase"] + metrics.tasks,
                    [[_phase_label(i, metrics.tasks)] + [None if v is None else f"{100 * v:.1f}%" for v in r]
                     for i, r in enumerate(rows.speaker_attribution)])
    return lines + [""]


def _data(eda: dict | None) -> list[str]:
    if eda is None:
        return []
    return ["## Data", ""] + _table(
        ["dataset", "utterances", "speakers", "mean tokens", f"≤ {eda['max_len']} tokens", "vocabulary"],
        [[d["name"], d["utterances"], ", ".join(f"{s} ({100 * v:.0f}%)" for s, v in d["speaker_share"].items()),
          d["tokens"]["mean"], f"{100 * d['tokens']['share_within_max_len']:.1f}%", d["vocabulary_total"]]
         for d in eda["datasets"]]) + ["", "Full EDA: [eda/eda.md](eda/eda.md)", ""]


def _training(metrics: RunMetrics, images: dict[str, str]) -> list[str]:
    if not metrics.phases:
        return []
    return ["## Training", "",
            "Validation loss: mean token NLL on the validation split, lower is better.", ""] + _table(
        ["phase", "dataset", "steps", "target tokens", "wall s", "tokens/s", "best val loss",
         "strategy before / after phase s"],
        [[p.phase, p.task, p.steps, p.target_tokens, p.wall_s, p.tokens_per_s, p.best_val_loss, _hooks(p.strategy)]
         for p in metrics.phases]) + ["", f"![loss curves]({images['loss']})", ""]


def _samples(metrics: RunMetrics) -> list[str]:
    lines = []
    alone = [s for s in metrics.samples if not s.context]
    if alone:
        lines += ["## Sample generations", ""] + _table(
            ["phase", "speaker", "text"], [[s.phase, f"{s.speaker} `{s.token}`", _cell(s.text)] for s in alone])
        lines.append("")
    replies = [s for s in metrics.samples if s.context]
    if replies:
        shown = ("every earlier turn of its window" if metrics.context_turns == "all"
                 else f"the last {metrics.context_turns} turns")
        lines += ["## Replies in context", "", f"The model's reply to real test-split contexts ({shown}), beside "
                  "the true reply.", ""] + _table(
            ["phase", "context", "speaker", "model's reply", "true reply"],
            [[s.phase, " / ".join(f"{_cell(who, 40)}: {_cell(text, 80)}" for who, text in s.context),
              f"{s.speaker} `{s.token}`", _cell(s.text), _cell(s.reference or "")] for s in replies])
        lines.append("")
    return lines


def strategy_sections(metrics: RunMetrics, config: dict) -> list[str]:
    """The config sections holding the run's strategy settings: as metrics.json records them, else (runs
    written before it did) the sections named after the strategy or its parts (`ewc_replay`: ewc, replay)."""
    if metrics.settings_sections is not None:
        return [s for s in metrics.settings_sections if s in config]
    if metrics.strategy in config:
        return [metrics.strategy]
    return [part for part in metrics.strategy.split("_") if part in config]


def _config(run_dir: Path, metrics: RunMetrics) -> list[str]:
    path = run_dir / RESOLVED
    if not path.exists():
        return []
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise UserError(f"{path}: not readable YAML; restore it from a phase folder's copy") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping of config sections; restore it from a phase folder's copy")
    own = strategy_sections(metrics, config)
    shown = {k: v for k, v in config.items() if k in BaseRunConfig.model_fields or k in own}
    sections = ", ".join(f"`{s}`" for s in own) or "none: it has no settings"
    if metrics.settings_sections is None:
        sections += "; named after the strategy, as this run's metrics.json does not list them"
    return ["## Config", "",
            f"The general settings and those of the strategy **{metrics.strategy}** (sections: {sections}). The full "
            f"resolved config, every other strategy's defaults included, is [{RESOLVED}]({RESOLVED}) in the run "
            f"folder: `{path.resolve()}`.", "",
            "```yaml", yaml.safe_dump(shown, sort_keys=False, allow_unicode=True).rstrip(), "```", ""]


def _cell(text: str, limit: int = 160) -> str:
    """Text for one Markdown table cell: one line, no column breaks, at most `limit` characters."""
    return text.replace("|", "\\|").replace("\n", " ")[:limit]


STYLE = ("body{font-family:sans-serif;max-width:960px;margin:auto;line-height:1.4}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}pre{background:#f6f6f6;padding:6px}"
         "li{margin:2px 0}")


def html_page(markdown: str, folder: Path, title: str = "cltune report") -> str:
    """The Markdown as one HTML page (markdown-it-py, raw HTML in the text escaped), images from `folder`
    inlined as base64 so the page stands alone."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                data = base64.b64encode((folder / unquote(str(child.attrGet("src")))).read_bytes()).decode()
                child.attrSet("src", f"data:image/png;base64,{data}")
    body = md.renderer.render(tokens, md.options, {})
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}</body></html>\n")


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").exists():
        raise UserError(f"{run_dir}: no metrics.json; point at a run folder (e.g. checkpoints/demo)")
    metrics = RunMetrics.read(run_dir / "metrics.json")
    logs, router = _read_phases(run_dir)
    eda_path = run_dir / "eda" / "eda.json"
    eda = read_json(eda_path) if eda_path.exists() else None  # everything read (or refused) before anything is written
    markdown = render_markdown(run_dir, metrics, IMAGES, eda, router)
    writable_folder(run_dir, "report")
    (run_dir / "report_assets").mkdir(exist_ok=True)
    _plots(run_dir, metrics, logs)
    atomic_write_text(run_dir / "report.md", markdown)
    atomic_write_text(run_dir / "report.html", html_page(markdown, run_dir))
    return run_dir / "report.md", run_dir / "report.html"


def _plots(run_dir: Path, metrics: RunMetrics, logs: dict[int, list[dict]]) -> None:
    rows, routing = metrics.scored()
    loss_curves(logs, run_dir / IMAGES["loss"])
    if metrics.ppl:
        ppl_heatmap(metrics.ppl, metrics.tasks, run_dir / IMAGES["heatmap"],
                    f"test perplexity — {routing_label(metrics.routing)}")
        if len(metrics.ppl) > 2:
            ppl_lines(metrics.ppl, metrics.tasks, run_dir / IMAGES["lines"],
                      f"each task over the phases — {routing_label(metrics.routing)}")
    if metrics.agnostic is not None and metrics.agnostic.ppl:
        ppl_heatmap(metrics.agnostic.ppl, metrics.tasks, run_dir / IMAGES["heatmap_agnostic"],
                    f"test perplexity — {routing_label('agnostic')}")
    if rows.forgetting_pct:
        forgetting_bars(rows.forgetting_pct, metrics.tasks, run_dir / IMAGES["forgetting"], routing_label(routing))
