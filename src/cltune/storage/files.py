"""Atomic file writes: write to a temporary sibling, then rename, so readers never see half a file."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path

from cltune.errors import DamagedFile, UserError, WriteError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def disk_full(path: str | Path) -> WriteError:
    return WriteError(f"{path}: no space left on device while writing it; nothing already on disk was replaced. "
                      "Free disk space")


def writable_folder(folder: str | Path, what: str) -> None:
    """Refuse in one line, before any work, an output folder that cannot be created or written: a read-only
    disk, no permission, a file in the way. Creates nothing: the probe goes to its nearest existing ancestor."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        probe = existing / f".cltune-write-test-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(f"{folder}: cannot write the {what} here ({reason} at {existing}); choose a writable "
                        "folder or fix its permissions") from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            raise disk_full(path) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | Path):
    """A JSON file's value; a truncated or garbled file is a `DamagedFile` naming it (a missing one, OSError)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise DamagedFile(f"{path}: damaged ({type(err).__name__}: not the JSON cltune wrote); restore it, or re-run "
                          "what wrote it") from None


def safe_name(name: str) -> str:
    """A task name usable as a file name: no separators, no leading dots (no path traversal)."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "task"
    return cleaned[:64]
