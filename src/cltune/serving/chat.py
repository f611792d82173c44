"""Talking to a saved checkpoint: replies in a chosen speaker's voice after the conversation so far.

`Talker` serves `cltune generate` (with or without `--context`) and `cltune chat`. A reply is
prompted as training encoded a target: the start token (checkpoints trained with one), the last
`context_turns` turns (each `<SPEAKER> text <eos>`, cut to the checkpoint's `max_length`, oldest
dropped first), the speaker token, the prompt. With
`context_turns: all` the turns are those of the conversation's current window, cut as training cut
windows (`cltune.data.windows`, the reply counted at its token budget): the window grows turn by
turn and, once the next reply would not fit, starts again at a turn that keeps at least half a
window of context. The weights are the ones the checkpoint's router gives the speaker (no task id),
as the run's agnostic evaluation scored them; a speaker several datasets share is sampled from the
mixture of theirs.

A chat keeps each voice's keys and values between turns (`PrefixCache`): inside a window a turn
computes only its own new tokens — the user's line and the reply — instead of the whole
conversation again. The mixture of a shared speaker keeps a cache per candidate within a reply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cltune.errors import UserError

if TYPE_CHECKING:  # torch and transformers load when a checkpoint does
    from cltune.modeling.generate import PrefixCache

DEFAULT_MAX_LENGTH = 100  # checkpoints saved before the meta recorded it used the config default


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 40
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0


class Talker:
    """A loaded checkpoint, ready to reply as any of its speakers."""

    def __init__(self, checkpoint: Path, context_turns: int | str | None = None, kv_cache: bool = True):
        from cltune.modeling.checkpoint import load_checkpoint
        from cltune.strategies.routing import load_router

        self.checkpoint = Path(checkpoint)
        self.model, self.tokenizer, meta = load_checkpoint(checkpoint)
        self.meta: dict = meta
        self.router = load_router(checkpoint, self.model)
        self.tokens: dict[str, str] = meta.get("speaker_tokens", {})
        self.task_speakers: list[list[str]] = [t["speakers"] for t in meta.get("tasks", [])]
        self.trained_turns: int | str = meta.get("context_turns", 0)  # "all": whole conversations
        self.context_turns = self.trained_turns if context_turns is None else context_turns
        self.max_length: int = meta.get("max_length", DEFAULT_MAX_LENGTH)
        self.start: list[int] = []  # checkpoints saved before rows began with the start token have none
        if meta.get("start_token", False):
            from cltune.modeling.batching import start_ids

            self.start = start_ids(self.tokenizer)
        self.kv_cache = kv_cache
        self.caches: dict[str, PrefixCache] = {}  # by the voice whose weights computed them

    def token(self, speaker: str, where: str | Path | None = None) -> str:
        """The token of `speaker`, given as a name (any case and spacing) or as the token itself."""
        from cltune.data.speakers import speaker_key

        if speaker in self.tokens.values():
            return speaker
        token = {speaker_key(name): token for name, token in self.tokens.items()}.get(speaker_key(speaker))
        if token is None:
            known = ", ".join(f"{name} {token}" for name, token in self.tokens.items())
            raise UserError(f"{where or self.checkpoint}: unknown speaker {speaker!r}; known: {known}")
        return token

    def name(self, token: str) -> str:
        return next((name for name, t in self.tokens.items() if t == token), token)

    def partner(self, token: str) -> str | None:
        """The speaker `token`'s speaker talks with: another speaker of the latest dataset it is in (None: unknown)."""
        for speakers in reversed(self.task_speakers):
            others = [s for s in speakers if self.tokens.get(s) != token]
            if len(others) < len(speakers) and others:
                return self.tokens[others[0]]
        return None

    def prompt(self, history: list[tuple[str, str]], token: str, text: str = "", reply_budget: int = 0,
               ) -> tuple[list[int], int]:
        """(ids, index of the speaker token): the start token, the context turns of `history` (the last
        `context_turns`, or with "all" the current window's, planned with the reply at `reply_budget` tokens) as far
        as they fit `max_length` with the speaker token and `text`, then those."""
        from cltune.data.windows import plan_windows
        from cltune.modeling.batching import layout, turn_ids

        tok = self.tokenizer
        end = [tok.eos_token_id] if tok.eos_token_id is not None else []
        target = [tok.convert_tokens_to_ids(token)] + tok(text, add_special_tokens=False)["input_ids"]
        turns = history if self.context_turns == "all" else \
            history[len(history) - self.context_turns :] if self.context_turns else []
        encoded = [turn_ids(tok.convert_tokens_to_ids(t), tok(x, add_special_tokens=False)["input_ids"], end)
                   for t, x in turns]
        room = self.max_length - len(self.start)
        if self.context_turns == "all" and encoded:  # the window the reply would be a target of
            lengths = [min(len(turn), room) for turn in encoded]
            lengths.append(min(len(target) + reply_budget + len(end), room))
            first, _ = plan_windows(lengths, [True] * len(lengths), room)[-1]
            encoded = encoded[first:]
        row = layout(self.start, encoded, target, self.max_length)
        return list(row), row.context

    def reply(self, history: list[tuple[str, str]], token: str, text: str = "", sampling: Sampling = Sampling(),
              emit: Callable[[str], None] | None = None) -> str:
        """A continuation of `text` by `token`'s speaker after `history` (the text not repeated); `emit` receives
        the reply piece by piece as it is generated."""
        from cltune.modeling.generate import PrefixCache, TextStream, generate_mixture, sample_continuations

        ids, start = self.prompt(history, token, text, reply_budget=sampling.max_new_tokens)
        stream = TextStream(self.tokenizer, emit) if emit else None
        options = {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                   "top_p": sampling.top_p, "seed": sampling.seed, "streamer": stream}
        if len(self.router.agnostic_choices(token)) > 1:
            return generate_mixture(self.model, self.tokenizer, lambda: self.router.agnostic_choices(token), ids,
                                    start=start, **options)
        cache = self.caches.setdefault(token, PrefixCache()) if self.kv_cache else None
        with self.router.agnostic(token):
            return sample_continuations(self.model, self.tokenizer, [ids], batch_size=1, cache=cache, **options)[0]


def read_context(talker: Talker, path: Path) -> list[tuple[str, str]]:
    """(token, text) turns from a dialogue file (CSV/JSONL rows of speaker and text, validated as training data)."""
    from cltune.data import load_dialogue

    return [(talker.token(u.speaker, f"{path}: line {u.line}"), u.text) for u in load_dialogue(path).utterances]


HELP = "commands: /reset (forget the conversation), /speaker NAME (who answers), /quit"


def chat(talker: Talker, speaker: str, user: str | None, lines: Iterable[str] | None, out, *,
         sampling: Sampling = Sampling(), ask: Callable[[str], str] | None = None) -> list[tuple[str, str]]:
    """A conversation: each line is the user's turn (or a command), answered by `speaker` and streamed to `out`
    (a rich Console) as `Name: reply`. Lines come from `lines`, or from `ask(label)` until it raises EOFError
    (interactive). Returns the conversation as (token, text) turns since the last /reset; each reply sees the
    last `talker.context_turns` of them."""
    voice = talker.token(speaker)
    user_token = talker.token(user) if user else talker.partner(voice)
    if user_token is None:
        raise UserError(f"{talker.checkpoint}: the checkpoint does not say who talks with {speaker!r}; "
                        "pass --user NAME")
    if talker.context_turns == 0:
        out.print(f"note: {talker.checkpoint} was trained without context turns (data.context_turns: 0), so each reply "
                  "sees only the speaker token; --context-turns N shows it the last N turns anyway", markup=False)
    history: list[tuple[str, str]] = []
    for number, line in enumerate(lines if ask is None else _typed(ask, f"{talker.name(user_token)}: ")):
        line = line.strip()
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command == "/quit":
                break
            if command == "/reset":
                history.clear()
                out.print("(conversation reset)", markup=False)
            elif command == "/speaker" and argument.strip():
                try:
                    voice = talker.token(argument.strip())
                    out.print(f"({talker.name(voice)} answers now)", markup=False)
                except UserError as err:
                    out.print(f"error: {err}", markup=False)
            else:
                out.print(HELP, markup=False)
            continue
        if not line:
            continue
        history.append((user_token, line))
        out.print(f"{talker.name(voice)}: ", end="", markup=False)
        turn = Sampling(sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.seed + number)
        try:
            text = talker.reply(history, voice, sampling=turn,
                                emit=lambda piece: out.print(piece, end="", markup=False, highlight=False))
        except KeyboardInterrupt:  # Ctrl-C while a reply is generated stops that reply, not the conversation
            out.print(" (stopped)", markup=False)
            history.pop()
            continue
        out.print(markup=False)
        history.append((voice, text))
    return history


def _typed(ask: Callable[[str], str], label: str) -> Iterator[str]:
    while True:
        try:
            yield ask(label)
        except (EOFError, KeyboardInterrupt):
            return
