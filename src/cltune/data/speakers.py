"""Speaker names: normalization, aliases, and the special token each speaker gets."""

from __future__ import annotations

import re
from collections import defaultdict

_SPACES = re.compile(r"\s+")
_TOKEN_CHARS = re.compile(r"[^A-Z0-9]+")


def normalize_speaker(raw: str, aliases: dict[str, str] | None = None) -> str:
    """Trim and collapse whitespace, then map through aliases matched case-insensitively."""
    name = _SPACES.sub(" ", raw).strip()
    if aliases:
        folded = {_SPACES.sub(" ", k).strip().casefold(): v for k, v in aliases.items()}
        name = folded.get(name.casefold(), name)
    return name


def speaker_key(name: str) -> str:
    """The matching key of a speaker: names differing only in case or spacing are one speaker."""
    return _SPACES.sub(" ", name).strip().casefold()


def _slug(words: list[str]) -> str:
    return "_".join(w for w in (_TOKEN_CHARS.sub("", w.upper()) for w in words) if w) or "SPEAKER"


def assign_speaker_tokens(names: list[str], overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Give every speaker a readable, unique token such as `<LEX>` for "Lex Fridman".

    The token is the upper-cased first name. Speakers sharing a first name get their whole
    name (`<GUEST_A>`, `<GUEST_B>`); anything still colliding gets a numeric suffix in sorted
    order, so the result depends only on the set of names, never on their order.
    """
    overrides = {speaker_key(k): v for k, v in (overrides or {}).items()}
    unique = sorted({speaker_key(n): n for n in names}.items())
    tokens: dict[str, str] = {}
    by_first: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key, name in unique:
        if key in overrides:
            tokens[name] = overrides[key]
        else:
            by_first[_slug(name.split()[:1])].append((key, name))
    taken = set(tokens.values())
    for first, group in sorted(by_first.items()):
        for _, name in group:
            base = f"<{first}>" if len(group) == 1 else f"<{_slug(name.split())}>"
            token, n = base, 2
            while token in taken:
                token, n = f"{base[:-1]}_{n}>", n + 1
            tokens[name] = token
            taken.add(token)
    by_key = {speaker_key(n): t for n, t in tokens.items()}
    # every spelling of a speaker (across files) gets its token
    return {**tokens, **{n: by_key[speaker_key(n)] for n in names}}
