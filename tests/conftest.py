"""Shared fixtures: a tiny tokenizer trained on the fly, a tiny Llama saved as a local model
folder, and small two-speaker dialogue CSVs. Nothing touches the network."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine thread hand-offs
# make each step many times slower; subprocesses (CLI tests) inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config) -> None:
    """Every test's temporary folder has a quote, double quotes, a space and non-ASCII letters in its
    path, so each command test also checks that no command breaks on such paths (issue: a path pasted
    into YAML text). An explicit --basetemp wins."""
    if config.option.basetemp is None:
        import tempfile

        config.option.basetemp = tempfile.mkdtemp(prefix="cltune it's \"odd\" é ")

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


def train_tiny_tokenizer(folder: Path):
    from tiny import train_tiny_tokenizer as train

    return train(folder, TOKENIZER_CORPUS)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide Llama with a 300-token BPE tokenizer, saved as a local HF model folder."""
    from tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"), TOKENIZER_CORPUS)


def prepared(model_dir: Path, tokens=("<HOST>", "<GUEST_A>"), r: int = 4):
    """(LoRA model with trainable speaker rows, tokenizer, new token ids) from a local model folder."""
    from cltune.config import LoraSettings, ModelSettings
    from cltune.modeling.model import add_special_tokens, attach_lora, load_base, resize_for

    model, tokenizer = load_base(ModelSettings(name=str(model_dir)))
    new_ids = add_special_tokens(tokenizer, list(tokens))
    resize_for(model, tokenizer)
    return attach_lora(model, LoraSettings(r=r, alpha=2 * r, dropout=0.0), new_ids), tokenizer, new_ids


@pytest.fixture()
def two_tasks(tmp_path) -> list[Path]:
    return [write_dialogue(tmp_path / "guest_a.csv", "Guest A", 60, 1),
            write_dialogue(tmp_path / "guest_b.csv", "Guest B", 40, 2)]


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


@pytest.fixture()
def tiny_config(tiny_model_dir, two_tasks, tmp_path):
    """Factory: tiny_config(strategy, **overrides) → a validated RunConfig."""
    from cltune.api import make_config

    def make(strategy: str = "naive", sets: list[str] | None = None, **extra):
        return make_config(tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", strategy, **extra), sets)

    return make


def stream_config(model_dir: Path, folder: Path, strategy: str = "ewc_replay", name: str = "tiny", **train) -> dict:
    """The tiny two-task stream the end-to-end and resume tests run: dropout on (a resume must reproduce
    random draws), Reptile's meta-training cut short, and `train` settings on top."""
    csvs = [folder / "guest_a.csv", folder / "guest_b.csv"]
    if not csvs[0].exists():
        write_dialogue(csvs[0], "Guest A", 60, 1)
        write_dialogue(csvs[1], "Guest B", 40, 2)
    raw = tiny_run_config(model_dir, csvs, folder / "runs", strategy, name=name)
    raw["lora"]["dropout"] = 0.1
    raw["train"].update(train)
    if strategy == "reptile":  # its default meta-training is a hundred extra steps
        raw["reptile"] = {"meta_iterations": 2, "inner_steps": 1}
    return raw


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread in the test process (CLI subprocesses get it from OMP_NUM_THREADS above): the tiny
    model's ops take microseconds while thread barriers on a busy 2-core machine take milliseconds, and equal
    thread counts keep float results comparable across processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    """A module's folder for the tiny stream's data and runs (`stream_config`)."""
    return tmp_path_factory.mktemp("stream")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, stream):
    """An uninterrupted in-process run of the tiny ewc_replay stream (replay buffer and Fisher state) with step
    checkpoints every 2 steps, in stream/runs/reference: what resumed and faulted runs must equal."""
    from cltune.api import make_config
    from cltune.studies.pipeline import run

    return run(make_config(stream_config(tiny_model_dir, stream, name="reference", checkpoint_every=2)))


@pytest.fixture(scope="session")
def strategy_streams(tiny_model_dir, tmp_path_factory):
    """`streams(strategy)` → (raw config, RunMetrics) of the uninterrupted tiny stream, run once per
    strategy per session and shared by the end-to-end tests and the resume tests."""
    from cltune.api import make_config
    from cltune.studies.pipeline import run

    folder, cache = tmp_path_factory.mktemp("streams"), {}

    def streams(strategy: str):
        if strategy not in cache:
            # a step checkpoint after every step, three steps a phase: resume tests stop and continue inside phase 2
            raw = stream_config(tiny_model_dir, folder, strategy, f"{strategy}-uninterrupted", checkpoint_every=1,
                                max_steps=3)
            cache[strategy] = (raw, run(make_config(raw)))
        return cache[strategy]

    return streams


@pytest.fixture()
def captured(monkeypatch):
    """The strategies the runs of a test build (through the registry), kept for inspection after the run."""
    from cltune.strategies import REGISTRY

    made, create = [], REGISTRY.create

    def capture(name, ctx, config):
        made.append(create(name, ctx, config))
        return made[-1]

    monkeypatch.setattr(REGISTRY, "create", capture)
    return made


class CliResult:
    """What one `cltune` command did: its exit code and what it printed."""

    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture()
def cli(monkeypatch, capsys):
    """`cli(*argv)` runs `cltune ARGV` in this process through the console script's entry point."""
    import sys

    def run(*argv) -> CliResult:
        from cltune.cli import main

        monkeypatch.setattr(sys, "argv", ["cltune", *map(str, argv)])
        try:
            main()
            code = 0
        except SystemExit as exited:
            code = exited.code if isinstance(exited.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
