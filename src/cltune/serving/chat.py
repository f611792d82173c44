"""Talking to a saved checkpoint: replies in a chosen speaker's voice after the conversation so far.

`Talker` serves `cltune generate` (with or without `--context`) and `cltune chat`. A reply is
prompted as training encoded a target: the last `context_turns` turns (each `<SPEAKER> text <eos>`,
cut to the checkpoint's `max_length`, oldest dropped first), the speaker token, the prompt. The
weights are the ones the checkpoint's router gives the speaker (no task id), as the run's agnostic
evaluation scored them; a speaker several datasets share is sampled from the mixture of theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cltune.errors import UserError

DEFAULT_MAX_LENGTH = 100  # checkpoints saved before the meta recorded it used the config default


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 40
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0


class Talker:
    """A loaded checkpoint, ready to reply as any of its speakers."""

    def __init__(self, checkpoint: Path, context_turns: int | str | None = None):
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

    def prompt(self, history: list[tuple[str, str]], token: str, text: str = "") -> tuple[list[int], int]:
        """(ids, index of the speaker token): the last `context_turns` (token, text) turns of `history` that fit
        `max_length` with the speaker token and `text`, then those."""
        from cltune.modeling.batching import fit_context, turn_ids

        tok = self.tokenizer
        end = [tok.eos_token_id] if tok.eos_token_id is not None else []
        target = [tok.convert_tokens_to_ids(token)] + tok(text, add_special_tokens=False)["input_ids"]
        if self.context_turns == "all":  # whole conversations: every earlier turn that fits
            turns = history
        else:
            turns = history[len(history) - self.context_turns :] if self.context_turns else []
        encoded = [turn_ids(tok.convert_tokens_to_ids(t), tok(x, add_special_tokens=False)["input_ids"], end)
                   for t, x in turns]
        context = fit_context(encoded, self.max_length - len(target))
        return context + target, len(context)

    def reply(self, history: list[tuple[str, str]], token: str, text: str = "", sampling: Sampling = Sampling(),
              emit: Callable[[str], None] | None = None) -> str:
        """A continuation of `text` by `token`'s speaker after `history` (the text not repeated); `emit` receives
        the reply piece by piece as it is generated."""
        from cltune.modeling.generate import TextStream, generate_mixture, sample_continuations

        ids, start = self.prompt(history, token, text)
        stream = TextStream(self.tokenizer, emit) if emit else None
        options = {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                   "top_p": sampling.top_p, "seed": sampling.seed, "streamer": stream}
        if len(self.router.agnostic_choices(token)) > 1:
            return generate_mixture(self.model, self.tokenizer, lambda: self.router.agnostic_choices(token), ids,
                                    start=start, **options)
        with self.router.agnostic(token):
            return sample_continuations(self.model, self.tokenizer, [ids], batch_size=1, **options)[0]


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
