"""Stopping cleanly on Ctrl-C (SIGINT) or SIGTERM.

The CLI installs `handlers()`. Inside the training loop (`deferred()`), the first signal only asks the
loop to stop at the end of its step: it saves a step checkpoint there and raises `Interrupted`, so
`--resume` continues exactly where it stopped. A second signal, or one outside the loop, stops at once
(Ctrl-C as KeyboardInterrupt, SIGTERM as `Interrupted`); every file is written atomically, so what is
on disk is whole either way. Without `handlers()` (a notebook), signals keep their default behaviour.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class Interrupted(BaseException):
    """The process was asked to stop; `where` says how far it got. Exit code 128 + the signal number."""

    def __init__(self, signum: int, where: str = "") -> None:
        super().__init__(signum, where)
        self.signum, self.where = signum, where

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        name = NAMES.get(self.signum, f"signal {self.signum}")
        return f"stopped by {name}" + (f" {self.where}" if self.where else "")


class _State:
    deferring = False
    requested: int | None = None


def _handle(signum, frame) -> None:
    if _State.deferring and _State.requested is None:
        _State.requested = signum
        # os.write, not print: a handler may run in the middle of another write to stderr
        os.write(2, f"\n{NAMES[signum]}: stopping after this step to save a checkpoint (Ctrl-C again stops at "
                    "once, without it)\n".encode())
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum)


@contextmanager
def handlers() -> Iterator[None]:
    """SIGINT and SIGTERM handled as above while inside; the previous handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in NAMES}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _State.deferring, _State.requested = False, None


@contextmanager
def deferred() -> Iterator[None]:
    """Within: a first signal is only recorded, for `requested()` to report at the end of a step."""
    _State.deferring, _State.requested = True, None
    try:
        yield
    finally:
        _State.deferring, _State.requested = False, None


def requested(accelerator=None) -> int | None:
    """The signal that asked this process (or, in a distributed run, any process) to stop; None if none.
    Every process must call it at the same step: they agree through one tiny gather."""
    signum = _State.requested
    if accelerator is not None and accelerator.num_processes > 1:
        import torch

        signum = int(accelerator.gather(torch.tensor([signum or 0], device=accelerator.device)).max()) or None
    return signum
