"""Training tokens/s of one cltune tree in fp32 and bf16, for before/after comparisons across commits.

Run it alternately on two checkouts (e.g. a `git worktree` of the old commit and this one), so load
hits both alike; each call appends one JSON line:

    for tree in /tmp/before /work/main /tmp/before /work/main; do
        OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/before_after.py $tree 4 sides.jsonl
    done

Each precision gets a fresh demo Context as `cltune run` builds it (`benchlib.demo_stream` of that
tree), a 1-step warm-up, then `steps` optimizer steps of guest A with the config's own settings.
"""

import json
import sys
import time

tree, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, f"{tree}/bench")
sys.path.insert(0, f"{tree}/src")

import cltune  # noqa: E402
from cltune.strategies import create_strategy  # noqa: E402

from benchlib import demo_stream, phase_settings, run_cltune, with_small_val  # noqa: E402

if not cltune.__file__.startswith(tree):
    raise SystemExit(f"imported cltune from {cltune.__file__}, not from {tree}")
figures = {}
for precision in ["fp32", "bf16"]:
    stream = demo_stream(precision=precision)
    strategy, task = create_strategy("naive", stream.ctx, stream.config), with_small_val(stream.tasks[0])
    run_cltune(stream, strategy, task, phase_settings(stream.config, 1))
    timed = run_cltune(stream, strategy, task, phase_settings(stream.config, steps))
    figures[precision] = {"tokens_per_s": timed.tokens_per_s, "load1": timed.load1, "tokens": timed.tokens,
                          "seconds": timed.seconds}
    print(tree, precision, f"{timed.tokens_per_s:.1f} tok/s (load {timed.load1})", flush=True)
with open(out, "a", encoding="utf-8") as fh:
    fh.write(json.dumps({"tree": tree, "time": time.strftime("%H:%M:%S"), **figures}) + "\n")
