"""Exploratory data analysis of dialogue datasets: counts, balance, lengths, vocabulary.

`summarize` is pure (numbers in a dict); `write_eda` turns that dict into eda.json, eda.md and
PNG histograms.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from cltune.data.loading import Dataset
from cltune.storage.files import atomic_write_text

DOMINANCE_THRESHOLD = 0.60
BATCH = 4096  # texts per tokenizer call
_WORD = re.compile(r"[\w']+")


def _stats(counts: Counter, max_len: int) -> dict:
    """Summary statistics of a length distribution given as {length: utterances}."""
    lengths, n = sorted(counts), sum(counts.values())

    def at(rank: int) -> int:  # the length at 0-based `rank` of the sorted lengths
        seen = 0
        for length in lengths:
            seen += counts[length]
            if seen > rank:
                return length
        raise IndexError(rank)

    low, high = at((n - 1) // 2), at(n // 2)
    return {
        "min": lengths[0],
        "mean": round(sum(k * v for k, v in counts.items()) / n, 2),
        "median": low if low == high else (low + high) / 2,
        "p90": at(min(n - 1, int(0.9 * n))),
        "max": lengths[-1],
        "share_within_max_len": round(sum(v for k, v in counts.items() if k <= max_len) / n, 4),
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


class TokenCounter:
    """A text's token length (without special tokens), and `batch` for many at once: a fast tokenizer
    counts a batch on every core (bundled tokenizer, 2 cores: 100,000 short utterances in 1.9 s in batches;
    20,000 one by one took 1.15 s)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> int:
        return self.batch([text])[0]

    def batch(self, texts: list[str]) -> list[int]:
        encoded = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return [len(ids) for ids in encoded]


def summarize(dataset: Dataset, count_tokens: Callable[[str], int] | None = None, max_len: int = 100,
              task=None) -> dict:
    """The EDA numbers of one dataset; token lengths use `count_tokens` (text → length; a `TokenCounter`
    counts in batches) or whitespace words; with its `task` (TaskData), the sizes of its splits too."""
    utts = dataset.utterances
    count_tokens = count_tokens or (lambda t: len(t.split()))
    batch = getattr(count_tokens, "batch", lambda texts: map(count_tokens, texts))
    # Length distributions as {length: utterances}: a million rows summarize in a few kilobytes.
    chars = Counter(len(u.text) for u in utts)
    tokens: Counter = Counter()
    for start in range(0, len(utts), BATCH):
        tokens.update(batch([u.text for u in utts[start : start + BATCH]]))
    per_speaker = Counter(u.speaker for u in utts)
    vocab: dict[str, set[str]] = {}
    for u in utts:
        vocab.setdefault(u.speaker, set()).update(w.lower() for w in _WORD.findall(u.text))
    shares = {s: round(n / len(utts), 4) for s, n in per_speaker.items()}
    by_length = (lambda u: (len(u.text), u.line))
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
        "char_lengths": sorted(chars.items()),  # [[length, utterances], ...]
        "token_lengths": sorted(tokens.items()),
        "missing": {"blank_rows": report.blank_rows, "missing_text_dropped": report.missing_dropped},
        "shortest": [{"line": u.line, "speaker": u.speaker, "text": u.text}
                     for u in heapq.nsmallest(5, utts, by_length)],
        "longest": [{"line": u.line, "speaker": u.speaker, "text": u.text} for u in heapq.nlargest(5, utts, by_length)],
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
        lines += ["", f"Missing values: {miss['blank_rows']} blank row(s), "
                  f"{miss['missing_text_dropped']} dropped text(s).", ""]
        for label in ("shortest", "longest"):
            lines.append(f"**5 {label}:** " + "; ".join(f"line {u['line']} ({u['speaker']}): {u['text'][:80]!r}"
                                                        for u in d[label]))
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
        for ax, key, unit in ((axes[0], "char_lengths", "characters"),
                              (axes[1], "token_lengths", summary["tokenizer"])):
            lengths, counts = zip(*d[key])
            ax.hist(lengths, bins=40, weights=counts, color="#4c72b0")
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
