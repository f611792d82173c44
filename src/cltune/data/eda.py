"""Exploratory data analysis of dialogue datasets: counts, balance, lengths, vocabulary.

`summarize` is pure (numbers in a dict); `write_eda` turns that dict into eda.json, eda.md and
PNG histograms.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from cltune.data.loading import Dataset
from cltune.files import atomic_write_text

DOMINANCE_THRESHOLD = 0.60
_WORD = re.compile(r"[\w']+")


def _stats(values: list[int], max_len: int) -> dict:
    return {
        "min": min(values),
        "mean": round(statistics.fmean(values), 2),
        "median": statistics.median(values),
        "p90": sorted(values)[min(len(values) - 1, int(0.9 * len(values)))],
        "max": max(values),
        "share_within_max_len": round(sum(v <= max_len for v in values) / len(values), 4),
    }


def split_summary(dataset: Dataset, task) -> dict:
    """Utterances and conversations (None without a conversation column) of each split of `task`."""
    conversation_of = {u.line: u.conversation for u in dataset.utterances}
    out = {}
    for split in ("train", "val", "test"):
        examples = getattr(task, split)
        ids = {conversation_of[e.line] for e in examples} if dataset.conversation_col else None
        out[split] = {"utterances": len(examples), "conversations": None if ids is None else len(ids)}
    return out


def summarize(dataset: Dataset, count_tokens: Callable[[str], int] | None = None, max_len: int = 100,
              task=None) -> dict:
    """The EDA numbers of one dataset; token lengths use `count_tokens` or whitespace words; with its
    `task` (TaskData), the sizes of its splits too."""
    utts = dataset.utterances
    count_tokens = count_tokens or (lambda t: len(t.split()))
    chars = [len(u.text) for u in utts]
    tokens = [count_tokens(u.text) for u in utts]
    per_speaker = Counter(u.speaker for u in utts)
    vocab: dict[str, set[str]] = {}
    for u in utts:
        vocab.setdefault(u.speaker, set()).update(w.lower() for w in _WORD.findall(u.text))
    shares = {s: round(n / len(utts), 4) for s, n in per_speaker.items()}
    by_length = sorted(utts, key=lambda u: (len(u.text), u.line))
    report = dataset.report
    return {
        "name": dataset.name,
        "path": str(dataset.path),
        "utterances": len(utts),
        "per_speaker": dict(per_speaker),
        "speaker_share": shares,
        "dominant_speakers": [s for s, v in shares.items() if v > DOMINANCE_THRESHOLD],
        "chars": _stats(chars, max_len),
        "tokens": _stats(tokens, max_len),
        "char_lengths": chars,
        "token_lengths": tokens,
        "missing": {"blank_rows": report.blank_rows, "missing_text_dropped": report.missing_dropped},
        "shortest": [{"line": u.line, "speaker": u.speaker, "text": u.text} for u in by_length[:5]],
        "longest": [{"line": u.line, "speaker": u.speaker, "text": u.text} for u in by_length[-5:][::-1]],
        "vocabulary": {s: len(v) for s, v in vocab.items()},
        "vocabulary_total": len(set().union(*vocab.values())),
        "conversations": None if dataset.conversations is None else len(dataset.conversations),
        "splits": None if task is None else split_summary(dataset, task),
    }


def _markdown(summary: dict) -> str:
    lines = [
        "# Exploratory data analysis",
        "",
        f"Token lengths counted with: **{summary['tokenizer']}**; max length {summary['max_len']} tokens.",
        "",
        "| dataset | utterances | speakers | mean chars | mean tokens | ≤ max len | vocabulary |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in summary["datasets"]:
        lines.append(
            f"| {d['name']} | {d['utterances']} | {len(d['per_speaker'])} | {d['chars']['mean']} | "
            f"{d['tokens']['mean']} | {100 * d['tokens']['share_within_max_len']:.1f}% | {d['vocabulary_total']} |"
        )
    for d in summary["datasets"]:
        lines += ["", f"## {d['name']}", "", "| speaker | turns | share | vocabulary |", "|---|---|---|---|"]
        for s, n in d["per_speaker"].items():
            flag = " ⚠ over 60%" if s in d["dominant_speakers"] else ""
            lines.append(f"| {s} | {n} | {100 * d['speaker_share'][s]:.1f}%{flag} | {d['vocabulary'][s]} |")
        lines += ["", "| length | min | mean | median | p90 | max |", "|---|---|---|---|---|---|"]
        for unit in ("chars", "tokens"):
            st = d[unit]
            lines.append(f"| {unit} | {st['min']} | {st['mean']} | {st['median']} | {st['p90']} | {st['max']} |")
        if d.get("conversations") is not None:
            lines += ["", f"{d['conversations']} conversations, "
                      f"{d['utterances'] / d['conversations']:.1f} utterances each on average."]
        if d.get("splits"):
            lines += ["", "| split | utterances | conversations |", "|---|---|---|"]
            lines += [f"| {name} | {v['utterances']} | {'–' if v['conversations'] is None else v['conversations']} |"
                      for name, v in d["splits"].items()]
        miss = d["missing"]
        lines += ["", f"Missing values: {miss['blank_rows']} blank row(s), {miss['missing_text_dropped']} dropped text(s).", ""]
        for label in ("shortest", "longest"):
            lines.append(f"**5 {label}:** " + "; ".join(f"line {u['line']} ({u['speaker']}): {u['text'][:80]!r}" for u in d[label]))
            lines.append("")
        lines.append(f"![lengths of {d['name']}]({d['name']}_lengths.png)")
    return "\n".join(lines) + "\n"


def _histograms(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for d in summary["datasets"]:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, key, unit in ((axes[0], "char_lengths", "characters"), (axes[1], "token_lengths", summary["tokenizer"])):
            ax.hist(d[key], bins=40, color="#4c72b0")
            ax.set_xlabel(f"length ({unit})")
            ax.set_ylabel("utterances")
        axes[1].axvline(summary["max_len"], color="#c44e52", linestyle="--", label="max length")
        axes[1].legend()
        fig.suptitle(d["name"])
        fig.tight_layout()
        path = out / f"{d['name']}_lengths.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def write_eda(summaries: list[dict], out_dir: str | Path, tokenizer_name: str, max_len: int) -> dict:
    """Write eda.json, eda.md and one PNG per dataset; returns the combined summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"tokenizer": tokenizer_name, "max_len": max_len, "datasets": summaries}
    _histograms(summary, out)
    atomic_write_text(out / "eda.json", json.dumps(summary, indent=1, ensure_ascii=False))
    atomic_write_text(out / "eda.md", _markdown(summary))
    return summary
