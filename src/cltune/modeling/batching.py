"""Utterances → token ids → length-grouped (optionally packed) micro-batches.

Each example is `<bos> [context turns] <SPEAKER> text <eos>`: the start token (the tokenizer's
beginning-of-sequence token, where it has one), the context turns (each `<SPEAKER> text <eos>`,
with `data.context_turns` > 0) and the speaker token are context, every later token is a target.
The start token is there because a speaker token at position 0 predicts its utterance's first
word poorly: the first position of these models attends to nothing but itself. Measured on the
demo config over 3 seeds, on the same target tokens: final test PPL 20% lower on guest A and 33%
lower on guest B with it (docs/benchmarks/context.md). Packed rows restart position ids at each example;
transformers reads that as a block-diagonal causal mask, so a packed example sees exactly what it
would see alone.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cltune.data.split import Example

IGNORE = -100


class Tokens(list):
    """One example's token ids; the first `context` of them are earlier turns (context only, never targets).
    `window`: the conversation window it is a target of (`context_turns: all`), whose other targets' ids are
    prefixes of, or extend, these."""

    def __init__(self, ids=(), context: int = 0, window: str | None = None):
        super().__init__(ids)
        self.context = context
        self.window = window


def start_ids(tokenizer) -> list[int]:
    """The start token every example begins with: the tokenizer's beginning-of-sequence token, if it has one."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def context_of(seq: Sequence[int]) -> int:
    """How many leading ids of an encoded example are context: the start token and any context turns (0 for a
    plain list)."""
    return getattr(seq, "context", 0)


def target_count(seq: Sequence[int]) -> int:
    """Target tokens of an encoded example: every id after the context and the speaker token."""
    return len(seq) - context_of(seq) - 1


def turn_ids(speaker_id: int, text_ids: list[int], end: list[int]) -> list[int]:
    """One context turn: `<SPEAKER> text <eos>`."""
    return [speaker_id, *text_ids, *end]


def fit_context(turns: list[list[int]], budget: int) -> list[int]:
    """The context that fits `budget` tokens: the latest turns whole, oldest dropped first; the oldest kept
    turn may lose the start of its text (keeping its speaker token and end) when at least one text token fits."""
    kept: list[int] = []
    for turn in reversed(turns):
        if len(turn) <= budget:
            kept, budget = turn + kept, budget - len(turn)
            continue
        if budget >= 3:  # speaker token, the last budget − 2 tokens of text and end token
            kept = [turn[0], *turn[len(turn) - budget + 1 :]] + kept
        break
    return kept


def layout(start: list[int], turns: list[list[int]], target: list[int], max_length: int,
           window: str | None = None) -> Tokens:
    """One row as training reads it and generation prompts it: the start token, the latest `turns` that fit
    `max_length` beside it and `target` (`fit_context`), then `target`."""
    context = start + fit_context(turns, max_length - len(start) - len(target))
    return Tokens(context + target, len(context), window)


def encode(examples: list[Example], tokenizer, max_length: int) -> list[Tokens]:
    """Token ids of each example: start token, context turns, speaker token, text, end-of-sequence token — at
    most `max_length`.

    The target utterance comes first: one that does not fit alone (after the start token) is cut to
    fit without its end token (its end was not reached, so neither training nor perplexity may
    claim it was), and leaves no room for context. The context turns fill the rest (`fit_context`).
    The target's ids do not depend on its context, so perplexity with and without context scores
    the same target tokens.
    """
    if not examples:
        return []
    texts = tokenizer([e.text for e in examples], add_special_tokens=False)["input_ids"]
    speaker_ids = tokenizer.convert_tokens_to_ids([e.token for e in examples])
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    start = start_ids(tokenizer)
    room = max_length - len(start) - 1  # text tokens that fit after the start and speaker tokens
    targets = [[s] + t + end if len(t) + len(end) <= room else [s] + t[:room] for s, t in zip(speaker_ids, texts)]
    turns = list(dict.fromkeys((turn.token, turn.text) for e in examples for turn in e.context))
    if not turns:
        return [Tokens(start + t, len(start), e.window) for e, t in zip(examples, targets)]
    turn_texts = tokenizer([text for _, text in turns], add_special_tokens=False)["input_ids"]
    turn_speakers = tokenizer.convert_tokens_to_ids([token for token, _ in turns])
    encoded_turns = {key: turn_ids(s, t, end) for key, s, t in zip(turns, turn_speakers, turn_texts)}
    return [layout(start, [encoded_turns[turn.token, turn.text] for turn in example.context], target, max_length,
                   example.window) for example, target in zip(examples, targets)]


@dataclass
class Batch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    target_example: torch.Tensor  # for each target token (row-major order), its example's index in `examples`
    examples: list[int]  # indices into the encoded list
    n_targets: int
    n_tokens: int  # real (non-pad) tokens
    lead: torch.Tensor | None = None  # per row: positions before its first target, computed without a graph
    row_tokens: torch.Tensor | None = None  # per row: real tokens (with `lead`)
    source: torch.Tensor | None = None  # per row: the row that computes its lead (itself: computed whole)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "labels": self.labels}
        if self.lead is not None:
            inputs |= {"lead": self.lead, "row_tokens": self.row_tokens}
        if self.source is not None:
            inputs["source"] = self.source
        return inputs


def _pack(order: list[int], lengths: list[int], pack_length: int) -> list[list[int]]:
    """First-fit-decreasing packing of sequences into rows of at most pack_length tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(order, key=lambda j: -lengths[j]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(pack_length - lengths[i])
    return rows


def _rows(encoded: list[list[int]], indices: list[int], merge: bool) -> list[tuple[int, list[int]]]:
    """(carrier, examples) per sequence to compute: each example alone, or with `merge` the targets of one
    window in one sequence — the longest, whose ids the others' are a prefix of (a variant that is not, such
    as attribution's other speaker token, stays alone)."""
    if not merge:
        return [(i, [i]) for i in indices]
    rows: list[tuple[int, list[int]]] = []
    carriers: dict[str, tuple[int, list[int]]] = {}
    for i in sorted(indices, key=lambda j: (-len(encoded[j]), j)):
        window = getattr(encoded[i], "window", None)
        row = carriers.get(window) if window is not None else None
        if row is not None and encoded[row[0]][: len(encoded[i])] == encoded[i]:
            row[1].append(i)
            continue
        rows.append((i, [i]))
        if window is not None and window not in carriers:
            carriers[window] = rows[-1]
    position = {i: k for k, i in enumerate(indices)}
    return sorted(rows, key=lambda row: position[row[0]])  # the micro-batch's order, as without merging


def collate(encoded: list[list[int]], indices: list[int], pad_id: int, pack_length: int | None = None,
            merge: bool = False, lead: bool = False, branch: bool = False) -> Batch:
    """One micro-batch: rows of one example each, or packed rows when pack_length is set. Labels hold
    the target tokens only: context turns and speaker tokens are IGNORE. With `merge`, the targets of one
    conversation window share the row of its longest (`_rows`): each example's targets are labelled in
    place and owned by it, so per-example sums and the token-weighted loss are those of separate rows
    (not for per-example gradients, which need an example to a row).

    With `lead`, each row's lead — the start token and the turns before its first target; in a long
    conversation's later window, the half window it re-reads from the window before — is marked for
    `TokenScorer` to compute without a graph: the same forward, no backward through it. Only when every row
    holds one sequence (a packed row's later sequences have no cache of their own).

    With `branch` (and merge, no packing), a row left alone by merging whose context is the start of a longer
    row of its window (attribution's variant with another speaker token after the same turns) becomes that
    row's branch: it computes only its own target, after the other row's keys and values (`TokenScorer`)."""
    rows_of = _rows(encoded, indices, merge)
    lengths = [len(encoded[carrier]) for carrier, _ in rows_of]
    placed = _pack(list(range(len(rows_of))), lengths, pack_length) if pack_length else [[r] for r in
                                                                                         range(len(rows_of))]
    width = max(sum(lengths[r] for r in row) for row in placed)
    ids = torch.full((len(placed), width), pad_id, dtype=torch.long)
    labels = torch.full((len(placed), width), IGNORE, dtype=torch.long)
    owner = torch.full((len(placed), width), -1, dtype=torch.long)
    positions = torch.zeros((len(placed), width), dtype=torch.long)
    for r, row in enumerate(placed):
        at = 0
        for carrier, members in (rows_of[k] for k in row):
            seq = torch.tensor(encoded[carrier])
            n = len(seq)
            ids[r, at : at + n] = seq
            for i in members:
                first, end = at + context_of(encoded[i]) + 1, at + len(encoded[i])  # targets follow the speaker token
                labels[r, first:end] = seq[first - at : end - at]
                owner[r, first:end] = i
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # padding forms its own block
    target_mask = labels[:, 1:] != IGNORE
    batch = Batch(ids, positions, labels, owner[:, 1:][target_mask], list(indices), int(target_mask.sum()),
                  sum(lengths))
    if lead and all(len(row) == 1 for row in placed):
        batch.lead = torch.tensor([min(context_of(encoded[i]) for i in rows_of[row[0]][1]) for row in placed])
        batch.row_tokens = torch.tensor([lengths[row[0]] for row in placed])
    elif branch and merge and not pack_length:
        source = _sources(encoded, [carrier for carrier, _ in rows_of])
        if source != list(range(len(source))):
            batch.source = torch.tensor(source)
            batch.lead = torch.tensor([context_of(encoded[c]) for c, _ in rows_of])
            batch.row_tokens = torch.tensor(lengths)
    return batch


def _sources(encoded: list[list[int]], carriers: list[int]) -> list[int]:
    """For each row (its carrier), the row whose ids begin with its context: a longer row of its window,
    computed whole, or itself."""
    source = list(range(len(carriers)))
    whole: dict[str, list[int]] = {}
    for r in sorted(range(len(carriers)), key=lambda r: (-len(encoded[carriers[r]]), r)):
        seq = encoded[carriers[r]]
        window = getattr(seq, "window", None)
        if window is None:
            continue
        n = context_of(seq)
        found = next((s for s in whole.get(window, []) if encoded[carriers[s]][:n] == seq[:n]), None) if n else None
        if found is None:
            whole.setdefault(window, []).append(r)
        else:
            source[r] = found
    return source


def length_grouped_batches(lengths: list[int], micro_batch_size: int, seed: int,
                           shuffle: bool = True) -> list[list[int]]:
    """Micro-batches of similar-length utterances (little padding), in a seeded random order.

    Utterances are shuffled, cut into chunks of 32 micro-batches, sorted by length inside each
    chunk and sliced; the micro-batches are then shuffled so long and short ones interleave.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    chunk = micro_batch_size * 32
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[k : k + micro_batch_size] for k in range(0, len(part), micro_batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def window_groups(windows: Sequence[str | None]) -> list[list[int]]:
    """Indices grouped by conversation window (`context_turns: all`), in first-appearance order; an example
    without a window is a group of its own. A group is computed as one row by `collate(merge=True)`."""
    groups: dict[str | int, list[int]] = {}
    for i, window in enumerate(windows):
        groups.setdefault(window if window is not None else i, []).append(i)
    return list(groups.values())


def window_batches(encoded: list[list[int]], rows: int) -> list[list[int]]:
    """Evaluation batches of whole windows: windows sorted by length, `rows` windows a batch."""
    groups = window_groups([getattr(seq, "window", None) for seq in encoded])
    ordered = sorted(groups, key=lambda g: (max(len(encoded[i]) for i in g), g[0]))
    return [[i for g in ordered[k : k + rows] for i in g] for k in range(0, len(ordered), rows)]
