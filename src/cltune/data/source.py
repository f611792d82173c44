"""A dialogue file's text as a stream of lines, so a file of millions of rows loads in memory bounded by
its utterances rather than by copies of the whole file; missing, unreadable, empty, non-UTF-8 files
and lines or cells too long to be one utterance are one-line errors naming the file and the line."""

from __future__ import annotations

import codecs
import io
from collections.abc import Iterator
from pathlib import Path

from cltune.errors import UserError

# The most characters one cell may hold: csv's own field limit. An utterance is never this long (tens of
# thousands of tokens against a max_length of hundreds), so a cell this size is an unclosed quote that
# swallowed the rest of the file, or a whole document pasted into one row.
MAX_CELL_CHARS = 131_072
# The most characters one physical line may hold (a chat-format line is a whole conversation): a longer
# line is refused before it is all in memory.
MAX_LINE_CHARS = 16 * 1024 * 1024
_CHUNK = 1 << 20
_BOM = codecs.BOM_UTF8


def cell_too_long(path: Path, where: str, chars: int | None = None) -> UserError:
    size = f"{chars:,}" if chars is not None else f"more than {MAX_CELL_CHARS:,}"
    return UserError(f"{path}: {where}: a cell holds {size} characters, more than one utterance may have "
                     f"({MAX_CELL_CHARS:,}); look for a quote that is never closed, or split the text into utterances")


def check_cell(path: Path, where: str, value: str) -> str:
    if len(value) > MAX_CELL_CHARS:
        raise cell_too_long(path, where, len(value))
    return value


def _not_utf8(path: Path) -> UserError:
    """The first byte that is not UTF-8, found by decoding the file again a chunk at a time."""
    decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                # A character split across chunks is held back by the decoder, so err.start counts from
                # the bytes it still held plus this chunk.
                held = len(err.object) - len(chunk)
                bad = offset - held + err.start
                line += err.object[: err.start].count(b"\n")
                return UserError(f"{path}: line {line}: byte 0x{err.object[err.start]:02x} at offset {bad} "
                                 "is not UTF-8; re-save the file with UTF-8 encoding")
            line += chunk.count(b"\n")
            offset += len(chunk)
    return UserError(f"{path}: the file ends inside a character (not UTF-8); re-save the file with UTF-8 encoding")


def text_lines(path: Path, flags: dict) -> Iterator[str]:
    """The file's lines (UTF-8, a byte-order mark dropped, line ends kept as csv wants them). Sets
    flags["bom"] and flags["crlf"] (CRLF seen in the first megabyte) before the first line."""
    try:
        fh = path.open("rb", buffering=_CHUNK)  # so that peek below sees the first megabyte, not 4 KB
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a CSV/JSONL file; pass the file itself") from None
    except (OSError, ValueError) as err:  # no permission, a name too long, a NUL in the name
        raise UserError(f"{path}: cannot read the file ({type(err).__name__}); "
                        "check the path and its permissions") from None
    with fh:
        head = fh.peek(_CHUNK)[:_CHUNK]
        flags["bom"], flags["crlf"] = head.startswith(_BOM), b"\r\n" in head
        text = io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")
        content, number = False, 0
        try:
            while line := text.readline(MAX_LINE_CHARS):
                number += 1
                if len(line) == MAX_LINE_CHARS and not line.endswith(("\n", "\r")):
                    raise UserError(f"{path}: line {number}: longer than {MAX_LINE_CHARS:,} characters; one line holds "
                                    "one utterance (one conversation in chat format): check the quoting on that line")
                content = content or not line.isspace()
                yield line
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    if not content:
        raise UserError(f"{path}: file is empty; it needs a header row and one utterance per row")
