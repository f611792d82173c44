"""Chat-format JSONL: one conversation per line, `{"messages": [{"role", "name", "content"}, ...]}`.

The speaker of a message is its `name` when present, else its `role`; `content` is a string or a
list of parts whose `text` parts are joined. Each line is one conversation: its id is the line's
own conversation-id key when it has one (`id`, `conversation_id`, ...), else its line number, so
splits keep conversations whole and context turns stay inside them. Other keys are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from cltune.errors import UserError

MESSAGES = "messages"
ID_KEYS = ("id", "conversation_id", "conversation", "dialogue_id", "dialog_id", "session_id", "episode_id")
FIX = 'each line must be {"messages": [{"role": ..., "content": ...}, ...]}'


def is_chat_format(first_line: str) -> bool:
    """Whether a JSONL file whose first line with content is `first_line` holds a list of messages."""
    try:
        first = json.loads(first_line)
    except (ValueError, RecursionError):
        return False
    return isinstance(first, dict) and isinstance(first.get(MESSAGES), list)


def _content(path: Path, number: int, index: int, value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return " ".join(str(p.get("text", "")) for p in value if p.get("type", "text") == "text")
    raise UserError(f"{path}: line {number}: message {index + 1}: `content` is {type(value).__name__}, not text; "
                    "give it a string (or a list of text parts)")


def chat_records(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, str, str, str]]:
    """(line, speaker, text, conversation id) of every message of a chat-format JSONL file's lines, in order;
    blank lines are skipped. A malformed line raises `UserError` naming it."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {number}: invalid JSON ({err.msg}); {FIX}") from None
        except (ValueError, RecursionError):
            raise UserError(f"{path}: line {number}: JSON too large or too deeply nested; {FIX}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(MESSAGES), list):
            raise UserError(f"{path}: line {number}: no `messages` list; {FIX}")
        ident = next((obj[k] for k in ID_KEYS if isinstance(obj.get(k), (str, int)) and str(obj[k]).strip()), None)
        conversation = str(ident).strip() if ident is not None else f"line {number}"
        for index, message in enumerate(obj[MESSAGES]):
            if not isinstance(message, dict):
                raise UserError(f"{path}: line {number}: message {index + 1} is not an object; {FIX}")
            speaker = message.get("name") or message.get("role")
            if not isinstance(speaker, str) or not speaker.strip():
                raise UserError(f"{path}: line {number}: message {index + 1} has no `name` or `role`; give each "
                                "message the speaker's name (or a role)")
            yield number, speaker, _content(path, number, index, message.get("content")), conversation
