"""Memory housekeeping: the oneDNN kernel cache bound and the heap trim."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cltune.modeling import memory


@pytest.mark.parametrize(("preset", "expected"), [(None, "64"), ("300", "300")])
def test_importing_cltune_bounds_the_onednn_kernel_cache_unless_the_user_set_it(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    code = "import cltune, os; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_pages_go_back_to_the_system():
    def rss_kib() -> int:
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])

    if memory._malloc_trim() is None:
        pytest.skip("not glibc")
    # 64 KiB blocks come from the heap (below the mmap threshold); freeing all but every 64th leaves the heap
    # full of holes the allocator keeps until trimmed.
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 << 10) for _ in range(4096)]  # 256 MiB
    for block in blocks:
        ctypes.memset(block, 1, 64 << 10)
    for i, block in enumerate(blocks):
        if i % 64:
            libc.free(block)
    before = rss_kib()
    memory.release_free_memory()
    after = rss_kib()
    for block in blocks[::64]:
        libc.free(block)
    assert before - after > 128 << 10  # more than half of the 252 MiB freed came back
