"""Deterministic train/validation/test splits — speaker-stratified per utterance, or by whole
conversations when the data names them — each utterance's context (the earlier turns of its
conversation), and the guard that keeps test utterances out of training, replay and Fisher estimation."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from cltune.data.loading import Dataset
from cltune.errors import UserError


class Split(str, Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


@dataclass(frozen=True)
class Turn:
    """An earlier turn of an utterance's conversation: shown to the model, never a target."""

    speaker: str
    token: str
    text: str
    line: int


@dataclass(frozen=True)
class Example:
    """One utterance ready for the model: its context (up to `data.context_turns` earlier turns of the
    same conversation and split, oldest first) and its speaker token are context, the text is the target.
    `window`: with `context_turns: all`, the window it is a target of (`cltune.data.windows`)."""

    task: int
    speaker: str
    token: str
    text: str
    split: Split
    line: int
    context: tuple[Turn, ...] = field(default=())
    window: str | None = None


@dataclass
class TaskData:
    index: int
    name: str
    speakers: list[str]
    tokens: dict[str, str]
    train: list[Example]
    val: list[Example]
    test: list[Example]


@dataclass(frozen=True)
class WindowSettings:
    """What `context_turns: all` cuts conversations with: each text's token length as a turn, the window size,
    and the speakers whose turns are targets (None: every speaker)."""

    turn_lengths: Callable[[list[str]], list[int]]
    max_length: int
    targets: tuple[str, ...] | None = None


class HeldOutLeakError(RuntimeError):
    """Raised when a held-out test utterance reaches code that learns from data."""


def require_no_test(examples, where: str) -> list:
    """Return `examples` as a list, refusing any test-split example: a bug, not a user error."""
    examples = list(examples)
    leaked = [e for e in examples if e.split is Split.TEST]
    if leaked:
        raise HeldOutLeakError(f"{len(leaked)} test-split utterance(s) reached {where}; "
                               "the test split is evaluation-only")
    return examples


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def split_counts(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Train/val/test sizes of a group of n rows (val and test rounded half up, train the rest)."""
    val, test = _round(n * fractions[1]), _round(n * fractions[2])
    return n - val - test, val, test


def min_rows(fractions: tuple[float, float, float]) -> int:
    n = 1
    while min(split_counts(n, fractions)) < 1 and n < 10_000:
        n += 1
    return n


def stratified_split(speakers: list[str], fractions: tuple[float, float, float], seed: int) -> list[Split]:
    """Assign each row a split, per speaker group, so each speaker keeps its share in every split."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(speakers):
        groups[s].append(i)
    rng = random.Random(seed)
    assignment: list[Split] = [Split.TRAIN] * len(speakers)
    for speaker in sorted(groups):
        rows = groups[speaker][:]
        rng.shuffle(rows)
        _, n_val, n_test = split_counts(len(rows), fractions)
        for i in rows[:n_test]:
            assignment[i] = Split.TEST
        for i in rows[n_test : n_test + n_val]:
            assignment[i] = Split.VAL
    return assignment


def grouped_split(conversations: list[str], fractions: tuple[float, float, float], seed: int) -> list[Split]:
    """Assign whole conversations to splits, so no test turn shares a conversation with a training turn.

    In seeded order, test and then validation take every conversation that brings them closer to
    their share of utterances (rounded half up); a split that no conversation brings closer takes the
    smallest one left. Training keeps the rest, and always at least one conversation. Conversations
    vary in length, so the shares are met only approximately: the EDA reports each split's size.
    """
    sizes: dict[str, int] = defaultdict(int)
    for c in conversations:
        sizes[c] += 1
    order = list(sizes)
    random.Random(seed).shuffle(order)
    _, want_val, want_test = split_counts(len(conversations), fractions)
    chosen: dict[str, Split] = {}
    for split, want, keep in ((Split.TEST, want_test, 2), (Split.VAL, want_val, 1)):  # keep: for the splits after
        held = 0
        for c in list(order):
            if len(order) > keep and abs(held + sizes[c] - want) < abs(held - want):
                order.remove(c)
                chosen[c], held = split, held + sizes[c]
        if held == 0 and len(order) > keep:
            c = min(order, key=lambda k: (sizes[k], order.index(k)))
            order.remove(c)
            chosen[c] = split
    return [chosen.get(c, Split.TRAIN) for c in conversations]


def conversation_keys(dataset: Dataset, context_turns: int | str) -> list[str] | None:
    """Each utterance's conversation: its id column, else (only when context is asked for) its
    blank-row-separated section of the file; None: utterances stand alone (split one by one)."""
    if dataset.conversation_col is not None:
        return [u.conversation for u in dataset.utterances]
    if context_turns == 0:
        return None
    blocks = [str(u.block) for u in dataset.utterances]
    if len(set(blocks)) < 3:
        raise UserError(
            f"{dataset.path}: data.context_turns {context_turns} needs the file's conversations, and it has no "
            f"conversation column and {len(set(blocks))} blank-row-separated section(s) (a split by conversation needs "
            "3); add a conversation column (e.g. conversation_id), separate conversations with a blank row, set "
            "data.one_conversation_per_file: true if each file is one conversation, or set data.context_turns: 0")
    return blocks


def with_context(examples: list[Example], keys: list[str] | None, context_turns: int) -> list[Example]:
    """`examples` (in file order) each with up to `context_turns` earlier turns of its conversation.

    A turn is context only for later turns of the same conversation *and* split: context never
    crosses a conversation or a split boundary (a split by conversation keeps them together anyway).
    """
    if context_turns == 0 or keys is None:
        return examples
    history: dict[tuple[str, Split], list[Turn]] = defaultdict(list)
    out = []
    for example, key in zip(examples, keys):
        earlier = history[key, example.split]
        out.append(Example(example.task, example.speaker, example.token, example.text, example.split, example.line,
                           tuple(earlier[-context_turns:])))
        earlier.append(Turn(example.speaker, example.token, example.text, example.line))
    return out


def consecutive_split(n: int, fractions: tuple[float, float, float]) -> list[Split]:
    """A file that is one conversation: its first turns train, the next validate, the last test (sizes as
    `split_counts`), so a turn's context never comes from another split's part of the file."""
    train, val, test = split_counts(n, fractions)
    return [Split.TRAIN] * train + [Split.VAL] * val + [Split.TEST] * test


def build_task(
    dataset: Dataset, index: int, tokens: dict[str, str], fractions: tuple[float, float, float], seed: int,
    context_turns: int | str = 0, windows: WindowSettings | None = None, whole_file: bool = False,
) -> TaskData:
    """A dataset's task: its split, and each utterance's context. `context_turns` "all" needs `windows` (the
    turn lengths, the window size and the target speakers: `cltune.data.windows`). `whole_file`: the file is
    one conversation (a transcript), split into consecutive parts."""
    utts = dataset.utterances
    pct = "/".join(f"{round(f * 100)}" for f in fractions)
    if whole_file:
        keys = [str(dataset.path)] * len(utts)
        assignment = consecutive_split(len(utts), fractions)
    elif (keys := conversation_keys(dataset, context_turns)) is not None:
        where = f"in column {dataset.conversation_col!r}" if dataset.conversation_col else "(blank-row-separated)"
        if len(set(keys)) < 3:
            raise UserError(f"{dataset.path}: {len(set(keys))} conversation(s) {where} are too few for a {pct} split "
                            "by conversation (needs 3); add conversations, or set data.conversation_col: none to "
                            "split by utterance")
        assignment = grouped_split(keys, fractions, seed)
    else:
        assignment = stratified_split([u.speaker for u in utts], fractions, seed)
    counts = {s: assignment.count(s) for s in Split}
    if min(counts.values()) < 1:
        raise UserError(
            f"{dataset.path}: {len(utts)} utterance rows are too few for a {pct} split "
            f"(needs at least {min_rows(fractions)}); add rows or change data.split"
        )
    examples = [Example(index, u.speaker, tokens[u.speaker], u.text, split, u.line)
                for u, split in zip(utts, assignment)]
    parts: dict[Split, list[Example]] = {s: [] for s in Split}
    if context_turns == "all":
        from cltune.data.windows import with_windows

        ready = with_windows(examples, keys, windows.turn_lengths, windows.max_length, windows.targets)
    else:
        ready = with_context(examples, keys, context_turns)
    for example in ready:
        parts[example.split].append(example)
    return TaskData(
        index,
        dataset.name,
        dataset.speakers,
        {s: tokens[s] for s in dataset.speakers},
        parts[Split.TRAIN],
        parts[Split.VAL],
        parts[Split.TEST],
    )
