"""Utterances → token ids → length-grouped (optionally packed) micro-batches.

Each utterance is `<SPEAKER> text <eos>`: the speaker token is context, every later token is a
target. Packed rows restart position ids at each utterance; transformers reads that as a
block-diagonal causal mask, so a packed utterance sees exactly what it would see alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from cltune.data.split import Example

IGNORE = -100


def encode(examples: list[Example], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of each example: speaker token, text, end-of-sequence token — at most `max_length`.

    An utterance that does not fit is cut to `max_length − 1` text tokens and gets no end token:
    its end was not reached, so neither training nor perplexity may claim it was.
    """
    if not examples:
        return []
    texts = tokenizer([e.text for e in examples], add_special_tokens=False)["input_ids"]
    speaker_ids = tokenizer.convert_tokens_to_ids([e.token for e in examples])
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    whole = max_length - 1 - len(end)  # text tokens that fit with the end token
    return [[s] + t + end if len(t) <= whole else [s] + t[: max_length - 1] for s, t in zip(speaker_ids, texts)]


@dataclass
class Batch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    target_example: torch.Tensor  # for each target token (row-major order), its example's index in `examples`
    examples: list[int]  # indices into the encoded list
    n_targets: int
    n_tokens: int  # real (non-pad) tokens

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "labels": self.labels}


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


def collate(encoded: list[list[int]], indices: list[int], pad_id: int, pack_length: int | None = None) -> Batch:
    """One micro-batch: rows of one utterance each, or packed rows when pack_length is set."""
    lengths = [len(s) for s in encoded]
    rows = _pack(indices, lengths, pack_length) if pack_length else [[i] for i in indices]
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            seq = torch.tensor(encoded[i])
            n = len(seq)
            ids[r, at : at + n] = seq
            labels[r, at + 1 : at + n] = seq[1:]
            owner[r, at : at + n] = i
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # padding forms its own block
    target_mask = labels[:, 1:] != IGNORE
    return Batch(
        ids, positions, labels, owner[:, 1:][target_mask], list(indices), int(target_mask.sum()), sum(lengths[i] for i in indices)
    )


def length_grouped_batches(lengths: list[int], micro_batch_size: int, seed: int, shuffle: bool = True) -> list[list[int]]:
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
