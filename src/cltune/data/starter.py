"""`cltune init`: a commented starter config for the user's own dialogue files (`cltune.api.init_config` checks
that it loads before writing it)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from cltune.config import BUNDLED_MODEL, BaseRunConfig, PhaseSettings
from cltune.errors import UserError


@dataclass(frozen=True)
class Starter:
    """What `init` wrote: the config file and the config it validates to."""

    path: Path
    config: BaseRunConfig


def _scalar(value) -> str:
    """`value` as one YAML scalar (quoted where YAML needs it: a path with a colon or a quote stays that path)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def _task_names(files: Sequence[Path]) -> list[str]:
    """Task names from the file names, made distinct (a.csv and other/a.csv become a and a_2)."""
    from cltune.storage.files import safe_name

    names, seen = [], Counter()
    for path in files:
        base = safe_name(path.stem)
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def _describe(dataset) -> str:
    """One comment line on what a file holds: utterances, conversations, the speakers and their shares."""
    counts = Counter(u.speaker for u in dataset.utterances)
    speakers = ", ".join(f"{name} ({n})" for name, n in counts.most_common(6))
    more = f" and {len(counts) - 6} more" if len(counts) > 6 else ""
    conversations = f" in {len(dataset.conversations)} conversations" if dataset.conversations else ""
    return f"{len(dataset.utterances)} utterances{conversations}; speakers {speakers}{more}"


def starter_text(files: Sequence[Path], datasets: Sequence, out: Path, *, name: str | None = None,
                 strategy: str | None = None, model: str | None = None, no_conversations: bool = False,
                 drop_missing: bool = False) -> str:
    """The commented YAML of a starter config: tasks in the given order, each with its detected columns; the run
    name defaults to the config file's name, the strategy and model to the config's defaults."""
    name = name or out.stem
    strategy = strategy or BaseRunConfig.model_fields["strategy"].default
    model = model or BUNDLED_MODEL
    folder = out.resolve().parent
    train = PhaseSettings()
    lines = [
        "# cltune run config for your own dialogue files, written by `cltune init`.",
        f"# Run it with:  cltune run {_scalar(str(out))}",
        "# Every key, its default and what it does: `cltune config-reference`.",
        f"name: {_scalar(name)}  # the run folder is output_dir/name",
        "output_dir: checkpoints",
        "seed: 0  # RNG seed: splits, data order, initialization",
        f"strategy: {_scalar(strategy)}  # `cltune strategies` lists the others",
        "model:",
        f"  name: {_scalar(model)}",
        "tasks:  # learned in this order, one phase each",
    ]
    for path, task, dataset in zip(files, _task_names(files), datasets):
        where = os.path.relpath(path.resolve(), folder)  # task paths are read relative to this file
        lines += [f"  # {_describe(dataset)}".replace("\n", " "),
                  f"  - name: {_scalar(task)}",
                  f"    path: {_scalar(where)}",
                  f"    speaker_col: {_scalar(dataset.speaker_col)}",
                  f"    text_col: {_scalar(dataset.text_col)}"]
        if dataset.conversation_col:
            lines.append(f"    conversation_col: {_scalar(dataset.conversation_col)}  "
                         "# splits keep conversations whole")
        elif no_conversations:
            lines.append("    conversation_col: none  # split by utterance")
    lines += [
        "data:",
        *(["  drop_missing: true  # rows with missing text are dropped, not refused"] if drop_missing else []),
        "  context_turns: 0  # earlier turns shown before each utterance (more context: better replies, "
        "longer training)",
        "train:  # every phase; phaseK.* overrides one phase, e.g. --set phase2.epochs=1",
        f"  epochs: {_scalar(train.epochs)}  # passes over each dataset",
        f"  lr: {_scalar(train.lr)}  # LoRA learning rate; the new speaker-token rows train at the same rate",
        f"  batch_size: {train.batch_size}  # utterances per optimizer step",
    ]
    return "\n".join(lines) + "\n"


def read_files(files: Sequence[Path], out: Path, *, overwrite: bool = False, columns: dict[str, str],
               drop_missing: bool = False,
               warn: Callable[[str], None] | None = None) -> list:
    """The dialogue files init describes, read and validated (an error names the file and the row), after
    checking that `out` may be written."""
    from cltune.data import load_dialogue

    if not files:
        raise UserError("init: name your dialogue files, e.g. cltune init host_guest_a.csv host_guest_b.csv")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it, or --out OTHER.yaml")
    if out.suffix.lower() not in {".yaml", ".yml"}:
        raise UserError(f"{out}: a run config is a YAML file; pass --out NAME.yaml")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such folder; create it first, or pass --out in an existing folder")
    datasets = [load_dialogue(path, **columns, drop_missing=drop_missing) for path in files]
    for dataset in datasets:
        for note in dataset.report.warnings():
            if warn is not None:
                warn(f"{dataset.path}: {note}")
    return datasets
