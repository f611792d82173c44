"""Resident memory after every optimizer step of the demo's guest A (`precision: auto`), to see what grows.

    python bench/rss_per_step.py [--steps 30] [--onednn-cache N] [--trim]

`--onednn-cache` sets ONEDNN_PRIMITIVE_CACHE_CAPACITY before torch loads (cltune's default is 64; oneDNN's
own is 1024); `--trim` returns the heap's free pages to the system after every step (glibc malloc_trim),
which separates memory still in use from fragmentation. Prints one line: RSS per step (MB), tokens/s, peak.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_mb() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) // 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--onednn-cache", type=int, default=None)
    parser.add_argument("--trim", action="store_true")
    args = parser.parse_args(argv)
    if args.onednn_cache is not None:
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.onednn_cache)  # before cltune's default applies
    import cltune.training.loop as loop
    from cltune.modeling.memory import peak_rss_mb, release_free_memory
    from cltune.strategies import create_strategy

    from benchlib import demo_stream, phase_settings, run_cltune, with_small_val

    stream = demo_stream()
    step, seen = loop._optimizer_step, []

    def measured(*a, **k):
        out = step(*a, **k)
        if args.trim:
            release_free_memory()
        seen.append(rss_mb())
        return out

    loop._optimizer_step = measured
    result = run_cltune(stream, create_strategy("naive", stream.ctx, stream.config), with_small_val(stream.tasks[0]),
                        phase_settings(stream.config, args.steps), phase=0)
    print(f"oneDNN cache {os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY']}, trim {args.trim}: RSS per step {seen} MB; "
          f"{result.tokens_per_s:.1f} tok/s; peak {peak_rss_mb():.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
