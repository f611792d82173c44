"""Plain helpers the tests share (conftest holds the fixtures): dialogue and conversation files, tiny run
configs, one in-process CLI runner, and small tools for damaging files, crashing runs and comparing them.
Tests import this module, never each other."""

from __future__ import annotations

import csv
import errno
import random
import sys
from pathlib import Path
from typing import NamedTuple

WORDS = {
    "Host": "so tell me what do you think about that question today".split(),
    "Guest A": "i really love pizza and music and long walks outside".split(),
    "Guest B": "quantum fields particles energy universe theory experiment".split(),
}


TOKENIZER_CORPUS = [" ".join(words) for words in WORDS.values()] * 20


# Evaluation settings for tests that check perplexities only: no attribution scoring, no samples (speed).
QUIET_EVAL = {"attribution": False, "samples_per_speaker": 0, "max_new_tokens": 4, "batch_size": 16}


PPL_ONLY = [f"eval.{key}={str(value).lower()}" for key, value in QUIET_EVAL.items()]


def write_dialogue(path: Path, guest: str, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["speaker", "text"])
        for i in range(rows):
            speaker = "Host" if i % 2 == 0 else guest
            writer.writerow([speaker, " ".join(rng.choices(WORDS[speaker], k=rng.randint(3, 9)))])
    return path


def write_conversations(path: Path, guest: str, conversations: int, seed: int = 0, *, column: bool = True,
                        interleave: bool = False) -> Path:
    """`conversations` Host↔guest conversations of 3–7 turns: a conversation column, or (column=False)
    blank rows between them. `interleave`: the rows of consecutive conversations alternate in the file."""
    rng = random.Random(seed)
    talks = []
    for c in range(conversations):
        turns = rng.randint(3, 7)
        talks.append([(f"c{c}", "Host" if i % 2 == 0 else guest, " ".join(rng.choices(WORDS["Host" if i % 2 == 0 else
                                                                                          guest], k=rng.randint(2, 6))))
                      for i in range(turns)])
    rows = []
    if interleave:
        for a, b in zip(talks[::2], talks[1::2]):
            rows += [r for pair in zip(a, b) for r in pair] + a[len(b):] + b[len(a):]
        rows += talks[-1] if len(talks) % 2 else []
    else:
        for talk in talks:
            rows += talk + ([("", "", "")] if not column else [])
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["conversation", "speaker", "text"] if column else ["speaker", "text"])
        for c, speaker, text in rows:
            writer.writerow([c, speaker, text] if column else ([speaker, text] if speaker else []))
    return path


def train_tiny_tokenizer(folder: Path):
    from tiny import train_tiny_tokenizer as train

    return train(folder, TOKENIZER_CORPUS)


def prepared(model_dir: Path, tokens=("<HOST>", "<GUEST_A>"), r: int = 4):
    """(LoRA model with trainable speaker rows, tokenizer, new token ids) from a local model folder."""
    from cltune.config import LoraSettings, ModelSettings
    from cltune.modeling.model import add_special_tokens, attach_lora, load_base, resize_for

    model, tokenizer = load_base(ModelSettings(name=str(model_dir)))
    new_ids = add_special_tokens(tokenizer, list(tokens))
    resize_for(model, tokenizer)
    return attach_lora(model, LoraSettings(r=r, alpha=2 * r, dropout=0.0), new_ids), tokenizer, new_ids


def tiny_run_config(model_dir: Path, csvs: list[Path], out: Path, strategy: str = "naive", **extra) -> dict:
    """A run config dict small enough for a unit test (seconds on a CPU)."""
    config = {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(out),
        "strategy": strategy,
        "model": {"name": str(model_dir), "precision": "fp32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"max_length": 24},
        "tasks": [{"path": str(p), "name": p.stem} for p in csvs],
        "train": {"epochs": 1, "lr": 5e-3, "batch_size": 8, "micro_batch_size": 4, "pack_length": 64},
        "eval": {"samples_per_speaker": 1, "max_new_tokens": 4, "batch_size": 16},
    }
    config.update(extra)
    return config


def stream_config(model_dir: Path, folder: Path, strategy: str = "ewc_replay", name: str = "tiny", *,
                  context_turns: int | str = 0, **train) -> dict:
    """The tiny two-task stream the end-to-end and resume tests run: dropout on (a resume must reproduce
    random draws), Reptile's meta-training cut short, and `train` settings on top. `context_turns` > 0 or "all": the
    files hold conversations (a conversation column) and each utterance comes with up to that many earlier
    turns (max_length 48 leaves them room); a folder's files are written once, by its first call."""
    csvs = [folder / "guest_a.csv", folder / "guest_b.csv"]
    if not csvs[0].exists():
        if context_turns:
            write_conversations(csvs[0], "Guest A", 14, 1)
            write_conversations(csvs[1], "Guest B", 10, 2)
        else:
            write_dialogue(csvs[0], "Guest A", 60, 1)
            write_dialogue(csvs[1], "Guest B", 40, 2)
    raw = tiny_run_config(model_dir, csvs, folder / "runs", strategy, name=name)
    raw["lora"]["dropout"] = 0.1
    if context_turns:
        raw["data"] = {"max_length": 48, "context_turns": context_turns}
    raw["train"].update(train)
    if strategy == "reptile":  # its default meta-training is a hundred extra steps
        raw["reptile"] = {"meta_iterations": 2, "inner_steps": 1}
    return raw


class CliResult(NamedTuple):
    """What one `cltune` command did: its exit code and what it printed."""

    code: int
    out: str
    err: str


def run_cli(monkeypatch, capsys, *argv) -> CliResult:
    """Run `cltune ARGV` in this process through the console script's entry point (`cltune.cli.main`)."""
    from cltune.cli import main

    monkeypatch.setattr(sys, "argv", ["cltune", *map(str, argv)])
    try:
        main()
        code = 0
    except SystemExit as exited:
        code = exited.code if isinstance(exited.code, int) else 0 if exited.code is None else 1
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def cltune_command(*args, code: str | None = None) -> list[str]:
    """The argv of a `cltune ARGS` child process (or of `python -c CODE ARGS`, for a patched entry point)."""
    return [sys.executable, *(["-c", code] if code else ["-m", "cltune"]), *map(str, args)]


def raw_config(model_dir: Path, folder: Path, strategy: str = "ewc_replay", name: str = "tiny", **train) -> dict:
    """The tiny stream with frequent step checkpoints (every 2 steps unless `train` says otherwise)."""
    return stream_config(model_dir, folder, strategy, name, **{"checkpoint_every": 2, **train})


def deterministic(metrics) -> dict:
    """metrics.json (or the RunMetrics a run returns) without what legitimately differs between equal runs:
    the name, wall times, seconds per stage and peak memory."""
    metrics = metrics if isinstance(metrics, dict) else metrics.to_json()
    out = {k: v for k, v in metrics.items() if k not in ("run", "peak_rss_mb", "stages_s")}
    out["phases"] = [{k: v for k, v in p.items() if k not in ("wall_s", "tokens_per_s")} for p in metrics["phases"]]
    for p in out["phases"]:
        p["strategy"] = {k: v for k, v in p["strategy"].items() if k != "hooks_s" and not k.endswith("wall_s")}
    return out


class SimulatedCrash(BaseException):
    """Raised from inside a run to stop it the way a crash would: nothing catches it."""


def crash_after_saves(monkeypatch, count: int) -> None:
    """Make the `count`-th step checkpoint the last thing the run does."""
    from cltune.training import resume

    original, calls = resume.StepCheckpoints.save, []

    def save(self, *args, **kwargs):
        path = original(self, *args, **kwargs)
        calls.append(path)
        if len(calls) == count:
            raise SimulatedCrash(path)
        return path

    monkeypatch.setattr(resume.StepCheckpoints, "save", save)


def phase1_relative(metrics: dict, folder: Path) -> dict:
    """metrics.json with `folder` taken out of where a reused phase 1 came from (the same run made in two folders)."""
    for phase in metrics["phases"]:
        if "phase1_from" in phase["strategy"]:
            phase["strategy"]["phase1_from"] = str(Path(phase["strategy"]["phase1_from"]).relative_to(folder))
    return metrics


def flip_byte(path: Path, at: int = -10) -> None:
    """Damage a file the way a bad disk does: one byte inverted."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def disk_full(*args, **kwargs):
    """Stands in for a write on a full disk."""
    raise OSError(errno.ENOSPC, "No space left on device")


def logits_of(ctx, examples, grad: bool = False):
    """The scorer's logits for `examples` (target positions), dropout off; without gradients unless `grad`."""
    import torch

    from cltune.modeling.batching import collate

    batch = collate(ctx.encode(examples), list(range(len(examples))), ctx.tokenizer.pad_token_id)
    with torch.set_grad_enabled(grad):
        return ctx.scorer.eval()(**batch.model_inputs())
