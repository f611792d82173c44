"""Strategy benchmark: every registered strategy on two streams, several seeds, through `cltune compare`.

- demo stream: host with guest A, then guest B (the demo's pair: a mild shift);
- hard stream: host with guest A, then paragraphs of the Python reference documentation that
  ships with every Python (`pydoc_data.topics`, one speaker "Python Docs"), then guest B.

The script only prepares: it writes the datasets and one config per stream (the shared budget),
runs `cltune compare` on each (resumable: rerun the same command and finished runs are reused),
and assembles docs/benchmarks/strategies.md from the two compare.md files, keeping the
hand-written reading between the notes markers.

    .venv/bin/python bench/strategies.py                              # the committed figures
    .venv/bin/python bench/strategies.py --streams hard --strategies replay,lwf --seeds 2   # a subset
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from cltune.data.demo import write_demo_corpus  # noqa: E402
from cltune.strategies import REGISTRY  # noqa: E402

from benchlib import cpu_description  # noqa: E402

NOTES = ("<!-- notes:start -->", "<!-- notes:end -->")


def python_docs_csv(path: Path, rows: int, seed: int) -> Path:
    """A one-speaker dataset of paragraphs from the Python reference docs bundled with Python."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(block.split())
            if len(text) >= 80 and not text.startswith((">>>", "...")):
                paragraphs.append(text)
    chosen = random.Random(seed).sample(paragraphs, rows)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["speaker", "text"])
        writer.writerows(("Python Docs", p) for p in chosen)
    return path


def streams(data: Path, rows: int) -> dict[str, list[dict]]:
    """The two streams' task lists: `rows` utterances per dataset (whole conversations, the last one cut)."""
    a, b, _ = write_demo_corpus(data, sizes={"A": rows, "B": rows, "C": rows}, seed=0)
    docs = python_docs_csv(data / "python_docs.csv", rows, seed=0)
    return {
        # The demo's own pair (src/cltune/configs/demo.yaml). Guest C's conversations are long: 200 of its turns are one
        # conversation, too few for a split that keeps conversations whole.
        "demo": [{"name": "guest_a", "path": str(a)}, {"name": "guest_b", "path": str(b)}],
        "hard": [{"name": "guest_a", "path": str(a)},
                 {"name": "python_docs", "path": str(docs), "conversation_col": "none"},  # paragraphs: no conversations
                 {"name": "guest_b", "path": str(b)}],
    }


def budget(args) -> dict:
    """The shared budget: every strategy trains with exactly these settings."""
    return {
        "model": {"name": args.model, "precision": args.precision},  # metrics.json records what auto chose
        "data": {"max_length": args.max_length, "split": [args.train_share, 0.1, round(0.9 - args.train_share, 6)]},
        "train": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                  "micro_batch_size": args.batch_size, "schedule": "constant", "warmup_ratio": 0.0},
        "eval": {"samples_per_speaker": 0, "attribution": args.attribution},
        # Reptile's meta-training is capped so its cost stays comparable; docs/howto/strategies.md documents the
        # default cost.
        "reptile": {"meta_iterations": args.reptile_iterations},
    }


def stream_config(name: str, tasks: list[dict], args) -> Path:
    path = args.out / f"{name}.yaml"
    config = {"name": name, "seed": 0, "output_dir": str(args.out / name), "tasks": tasks, **budget(args)}
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def kept_notes(doc: Path) -> list[str]:
    """The hand-written reading of the results in an existing doc (between the NOTES markers), kept on rewrite."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    if NOTES[0] not in text or NOTES[1] not in text:
        return [NOTES[0], NOTES[1], ""]
    return [text[text.index(NOTES[0]) : text.index(NOTES[1]) + len(NOTES[1])], ""]


def section(stream: str, tasks: list[dict], compare_dir: Path, doc: Path) -> list[str]:
    """The stream's compare.md under a stream heading (headings one level down), its plot and data copied beside the
    doc, named after it (strategies.md → strategies_hard.png)."""
    text = (compare_dir / "compare.md").read_text(encoding="utf-8")
    body = text.split("\n", 1)[1]  # the page title is the stream heading here
    body = re.sub(r"^## ", "### ", body, flags=re.M)
    png, data = doc.parent / f"{doc.stem}_{stream}.png", doc.parent / f"{doc.stem}_{stream}.json"
    shutil.copyfile(compare_dir / "compare.png", png)
    shutil.copyfile(compare_dir / "compare.json", data)
    body = body.replace("(compare.png)", f"({png.name})")
    return [f"## {stream} stream: {' → '.join(t['name'] for t in tasks)}", "", f"Data: [{data.name}]({data.name}).",
            body]


def resolution(compare_dir: Path) -> str:
    """Median half-width of the paired intervals against naive, per task: the smallest difference this budget
    resolves."""
    summary = json.loads((compare_dir / "compare.json").read_text(encoding="utf-8"))
    widths: dict[str, list[float]] = {t: [] for t in summary["tasks"]}
    for entry in summary["strategies"].values():
        for task, c in (entry.get("vs_naive") or {}).items():
            widths[task].append((c["high_pct"] - c["low_pct"]) / 2)
    median = {t: sorted(w)[len(w) // 2] for t, w in widths.items() if w}
    return ", ".join(f"{t} ±{w:.1f}" for t, w in median.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=",".join(REGISTRY))
    parser.add_argument("--demo-strategies", default=None,
                        help="a shorter list for the demo stream (default: --strategies)")
    parser.add_argument("--streams", default="hard,demo")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--precision", default="auto", help="model.precision of every run (auto: bf16 where native)")
    parser.add_argument("--rows", type=int, default=200, help="utterances per dataset")
    parser.add_argument("--train-share", type=float, default=0.4,
                        help="training share of the split (validation 0.1, test the rest): fewer training rows, "
                             "more test rows")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--attribution", action=argparse.BooleanOptionalAction, default=False,
                        help="score speaker attribution (doubles the test-set cost on two-speaker tasks)")
    parser.add_argument("--reptile-iterations", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "bench-strategies")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks" / "strategies.md")
    parser.add_argument("--collect", action="store_true", help="only rebuild the doc from the finished compare folders")
    parser.add_argument("--title", default="Strategy benchmark", help="the doc's heading")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    all_streams = streams(args.out / "data", args.rows)
    sections, resolved = [], []
    for stream in args.streams.split(","):
        config = stream_config(stream, all_streams[stream], args)
        compare_dir = args.out / stream / "compare"
        if not args.collect:
            print(f"[{stream}] cltune compare …", flush=True)
            names = (args.demo_strategies or args.strategies) if stream == "demo" else args.strategies
            subprocess.run([sys.executable, "-m", "cltune", "compare", str(config), "--strategies", names,
                            "--seeds", str(args.seeds), "--out", str(compare_dir)], check=True)
        sections += section(stream, all_streams[stream], compare_dir, args.doc)
        resolved.append(f"{stream}: {resolution(compare_dir)}")

    ran = ", ".join(sorted({json.loads(m.read_text(encoding="utf-8"))["precision"]
                            for stream in args.streams.split(",")
                            for m in (args.out / stream / "compare" / "runs").glob("*/metrics.json")}))
    cpu = cpu_description()
    flags = ", ".join(f for f, on in cpu["flags"].items() if on)
    # The command that produced the figures: where files go, and rebuilding the doc, do not change them.
    shown, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg == "--collect":
            skip = False
            continue
        if arg in ("--out", "--doc", "--title"):
            skip = True
            continue
        shown.append(arg)
    command = " ".join(["python bench/strategies.py", *shown])
    b = budget(args)
    head = [
        f"# {args.title}", "",
        f"Command: `{command}` · {datetime.date.today()} · {cpu['model_name']} ({flags}), "
        f"{len(os.sched_getaffinity(0))} "
        f"cores, CPU only. Each stream is one `cltune compare` over {args.seeds} seeds (each seed reseeds the split, "
        "sampling and initialization); its runs are in the compare folder's `runs/`.", "",
        f"Budget, the same for every strategy, reduced to fit a 2-core machine's afternoon: model `{args.model}`, "
        f"precision {args.precision} ({ran} here, as each run's metrics.json records); {args.rows} utterances per "
        "dataset; "
        f"split {b['data']['split'][0]:g}/0.1/{b['data']['split'][2]:g} (train/validation/test, whole conversations), "
        "i.e. **fewer training rows and more test rows** than the defaults; utterances cut at "
        f"{args.max_length} tokens; {args.epochs:g} epoch(s) per phase at constant LR {args.lr:g}, {args.batch_size} "
        f"utterances per step; strategy settings at their defaults except Reptile (`meta_iterations: "
        f"{args.reptile_iterations}`); " + ("speaker attribution scored." if args.attribution else
                                             "no speaker attribution (it doubles the test cost; its column "
                                             "reads –)."), "",
        "Resolution: the median half-width of the paired intervals against naive (per cent of final test PPL) — "
        + "; ".join(resolved) + ". A smaller difference is not resolved by this budget.", "",
        "Wall time counts training and strategy hooks (not evaluation). Short test runs shared the two cores during "
        "part of the hard stream, so read wall time for its order of magnitude; the pass ratios are exact counts.", "",
    ]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text("\n".join(head + kept_notes(args.doc) + sections), encoding="utf-8")
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
