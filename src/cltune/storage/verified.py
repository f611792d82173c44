"""Folders written whole or not at all: built in a temporary sibling, listed in a manifest of sizes
and SHA-256 hashes, synced and renamed, so a crash (or kill -9, or a full disk) never leaves half a
folder and never harms the previous one; a folder whose files do not match its manifest is refused."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from cltune.errors import UserError, WriteError
from cltune.storage.files import DISK_FULL, disk_full, read_json, write_json

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    write_json(folder / MANIFEST, {"files": entries})


def _manifest_entries(folder: Path, required: tuple[str, ...]) -> dict:
    """The manifest's file entries; a manifest that is itself damaged is a refusal, not a traceback."""
    try:
        entries = read_json(folder / MANIFEST)["files"]
        checked = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{folder}: {MANIFEST} is unreadable or damaged; this checkpoint cannot be trusted") from None
    if (any(name not in checked for name in required)
            or any(Path(k).is_absolute() or ".." in Path(k).parts for k in checked)):
        raise UserError(f"{folder}: {MANIFEST} does not describe a cltune checkpoint; "
                        "this checkpoint cannot be trusted")
    return checked


def phase_folders(run_dir: str | Path) -> list[Path]:
    """A run folder's phase checkpoint folders (`phase1`, `phase2`, …), in phase order."""
    folders = [f for f in Path(run_dir).glob("phase*") if f.is_dir() and f.name[5:].isdigit()]
    return sorted(folders, key=lambda f: int(f.name[5:]))


def verify(folder: str | Path, required: tuple[str, ...] = ()) -> None:
    """Refuse a folder with a missing or damaged manifest (or one that lists none of `required`), or files
    that are missing or changed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: {'is a file' if folder.exists() else 'no such folder'}; "
                        "pass a phase folder of a run, e.g. checkpoints/demo/phase2")
    if not (folder / MANIFEST).is_file():
        phases = [p.name for p in phase_folders(folder) if (p / MANIFEST).is_file()]
        if phases:  # a run folder: name the phase folders it holds
            raise UserError(f"{folder}: a run folder, not a checkpoint; pass one of its phase folders: "
                            + ", ".join(str(folder / name) for name in phases))
        raise UserError(f"{folder}: not a complete cltune checkpoint (no {MANIFEST}); "
                        "point at a phase folder or re-run")
    for name, (size, digest) in _manifest_entries(folder, required).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size or _sha256(path) != digest:
            raise UserError(f"{folder}: {name} is missing or corrupted (does not match {MANIFEST}); this checkpoint "
                            "cannot be used: re-run that phase, or delete a damaged step checkpoint to resume "
                            "from an earlier one")


TEMP_SUFFIX = ".tmp"  # every temporary file or folder ends so; leftovers of a crash are safe to delete


def _fsync_tree(folder: Path) -> None:
    """Flush every file and the folder itself, so the rename publishes data that is on disk."""
    for path in [*sorted(p for p in folder.rglob("*") if p.is_file()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_folder(folder: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with `fill(tmp)` in a temporary sibling, add its manifest, then swap it in.

    Until the final rename the previous folder is untouched, so any failure (a full disk
    included) leaves it intact; a full disk becomes a `UserError` that says so.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=TEMP_SUFFIX))
    try:
        fill(tmp)
        _write_manifest(tmp)
        _fsync_tree(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old{TEMP_SUFFIX}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, WriteError) or (isinstance(err, OSError) and err.errno in DISK_FULL):
            raise disk_full(folder) from None  # named by the folder, not the temporary file that ran out
        raise
    return folder


def remove_temp_leftovers(folder: str | Path) -> None:
    """Clean what a killed writer left behind (hidden names ending in .tmp); never a finished file.

    A writer killed between its two renames leaves the previous folder as `.NAME.old.tmp` and no
    NAME: that folder is put back, not deleted.
    """
    folder = Path(folder)
    for path in sorted(folder.glob(f".*{TEMP_SUFFIX}")) if folder.is_dir() else []:
        name = path.name[1 : -len(f".old{TEMP_SUFFIX}")] if path.name.endswith(f".old{TEMP_SUFFIX}") else None
        if name and path.is_dir() and not (folder / name).exists():
            os.replace(path, folder / name)
        else:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
