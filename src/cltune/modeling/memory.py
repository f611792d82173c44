"""Process memory: the peak resident set, and handing freed heap pages back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)  # bytes on macOS, KiB on Linux


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc `malloc_trim`; a no-op elsewhere).

    Tensors freed during training leave the heap fragmented and the process's resident size high;
    before a big allocation (a bf16 base upcast to fp32 for evaluation) that slack is handed back so
    the two do not add up in the peak. Milliseconds; not meant for every step."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
