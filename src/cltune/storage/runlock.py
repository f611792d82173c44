"""One run at a time per run folder: RUN/.cltune.lock holds the owner's PID, host, command and start time,
and an OS lock (flock) on it lasts as long as the owner's process. A second run into the same folder
refuses at start, naming the owner; the OS drops the lock when its process dies (kill -9 included), so a
lock file left behind by a dead run is stale and is taken over."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cltune.errors import UserError
from cltune.storage.files import writable_folder

LOCK_FILE = ".cltune.lock"
_held: dict[Path, int] = {}  # folders this process holds, and how many nested claims hold each


def _holder(text: str) -> str:
    """The owner recorded in a lock file, in words."""
    try:
        owner = json.loads(text)
        return f"PID {owner['pid']} on {owner['host']}, started {owner['started']}: {owner['command']}"
    except (ValueError, KeyError, TypeError):
        return "owner unknown"


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 1 << 16).decode("utf-8", "replace")


def _lock(path: Path, run_dir: Path) -> int:
    """An open descriptor of the lock file on disk, locked; refuses when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _holder(_read(fd))
            os.close(fd)
            raise UserError(f"{run_dir}: another cltune run is using this run folder ({owner}); wait for it to "
                            "finish or stop it, or choose another run folder (run, demo: --set name=NEW; "
                            "train: another --out)") from None
        try:  # the owner unlinks the file as it lets go: the file we locked must still be the one on disk
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def main_process() -> bool:
    """Whether this is the main process of a launched run (global rank 0), read as Accelerate reads it from the
    launcher's environment (torchrun, accelerate launch, MPI), without initializing Accelerate's process state
    before the run's Accelerator does."""
    from accelerate.utils import get_cpu_distributed_information

    return get_cpu_distributed_information().rank == 0


@contextmanager
def claim(run_dir: Path, *, enabled: bool = True, notify: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `run_dir` for this process (re-entrant); creates it, or refuses in one line when it cannot be
    written or another live run holds it. `enabled=False` (a non-main process of a distributed run) holds
    nothing. `notify` hears about a stale lock taken over."""
    key = run_dir.resolve()
    if not enabled:
        yield
        return
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    writable_folder(run_dir, "run folder")
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)  # writable_folder has just probed where it goes
    path = run_dir / LOCK_FILE
    fd = _lock(path, run_dir)
    left = _read(fd)
    if left.strip() and notify is not None:
        notify(f"{path}: taking over a stale lock ({_holder(left)}; that process is no longer running)")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        # while still locked: a claimant that opened it meanwhile finds it gone and retries
        path.unlink(missing_ok=True)
        os.close(fd)
        for folder in created:  # stopped before writing anything: leave no trace
            if any(folder.iterdir()):
                break
            folder.rmdir()
