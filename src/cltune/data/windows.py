"""Whole conversations at the cost of single turns (`data.context_turns: all`).

Each conversation (within one split) is cut into windows of at most `max_length` tokens that start
at a turn. Every target turn (a turn of a speaker in `data.targets`) is a target in exactly one
window and sees every earlier turn of that window: all of its conversation before it while that
fits, else at least half a window (⌊max_length / 2⌋ tokens, rounded up to the start of a turn) —
unless the target is so long that less fits beside it. Windows overlap only where a conversation is
longer than a window.

A target is an ordinary `Example` whose context is its window's earlier turns, with the window's
key in `Example.window`. The examples of one window encode to prefixes of one another, so training
and evaluation compute a whole window in one row (`cltune.modeling.batching.collate` with
`merge=True`), each target scored exactly as it would be alone after the same turns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate

from cltune.data.split import Example, Turn


def plan_windows(lengths: Sequence[int], targets: Sequence[bool], max_length: int) -> list[tuple[int, list[int]]]:
    """One conversation's windows: (first turn, its target turns) each, from the turns' token lengths
    (each at most `max_length`) and which turns are targets. See the module docstring for the rule."""
    starts = [0, *accumulate(lengths)]  # starts[i]: tokens before turn i
    half = max_length // 2
    pending = [i for i, target in enumerate(targets) if target]
    windows: list[tuple[int, list[int]]] = []
    k = 0
    while k < len(pending):
        first = pending[k]
        want, room = min(half, starts[first]), max_length - lengths[first]
        start = first  # back to the latest turn that gives `want` tokens of context, as far as it fits
        while start > 0 and starts[first] - starts[start] < want and starts[first] - starts[start - 1] <= room:
            start -= 1
        end = first + 1
        while end < len(lengths) and starts[end + 1] - starts[start] <= max_length:
            end += 1
        chosen = [t for t in pending[k:] if t < end]
        windows.append((start, chosen))
        k += len(chosen)
    return windows


def with_windows(examples: list[Example], keys: list[str], turn_lengths: Callable[[list[str]], list[int]],
                 max_length: int, targets: Sequence[str] | None) -> list[Example]:
    """`examples` (one per utterance, in file order; `keys`: their conversations) as window targets: the
    utterances of the speakers in `targets` (every speaker: None), each with its window's earlier turns as
    context. `turn_lengths` gives the token length of each text as one turn (speaker token, text, end token)."""
    lengths = turn_lengths([e.text for e in examples])
    conversations: dict[tuple[str, str], list[int]] = {}
    for i, (example, key) in enumerate(zip(examples, keys)):
        conversations.setdefault((key, example.split.value), []).append(i)
    out: list[tuple[int, Example]] = []
    for (key, split), members in conversations.items():
        turns = [Turn(examples[i].speaker, examples[i].token, examples[i].text, examples[i].line) for i in members]
        wanted = [targets is None or examples[i].speaker in targets for i in members]
        plan = plan_windows([min(lengths[i], max_length) for i in members], wanted, max_length)
        for w, (start, chosen) in enumerate(plan):
            for t in chosen:
                e = examples[members[t]]
                out.append((members[t], Example(e.task, e.speaker, e.token, e.text, e.split, e.line,
                                                tuple(turns[start:t]), window=f"{key!r}/{split}/{w}")))
    return [e for _, e in sorted(out, key=lambda pair: pair[0])]  # file order, as every other mode
