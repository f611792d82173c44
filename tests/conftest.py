"""Shared fixtures: a tiny tokenizer trained on the fly, a tiny Llama saved as a local model
folder, and small two-speaker dialogue CSVs. Nothing touches the network."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers import TOKENIZER_CORPUS, run_cli, stream_config, tiny_run_config, write_dialogue

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine thread hand-offs
# make each step many times slower; subprocesses (CLI tests) inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")


_MADE_BASETEMP = pytest.StashKey[Path]()


def pytest_configure(config) -> None:
    """Every test's temporary folder has a quote, double quotes, a space and non-ASCII letters in its
    path, so each command test also checks that no command breaks on such paths (issue: a path pasted
    into YAML text). An explicit --basetemp wins."""
    if config.option.basetemp is None:
        import tempfile

        config.option.basetemp = tempfile.mkdtemp(prefix="cltune it's \"odd\" é ")
        config.stash[_MADE_BASETEMP] = Path(config.option.basetemp)


def pytest_sessionfinish(session, exitstatus) -> None:
    """The folder pytest_configure made goes once every test passed (a run leaves about 400 MB there); after a
    failure it stays for a look, and the summary names it."""
    made = session.config.stash.get(_MADE_BASETEMP, None)
    if made is None or hasattr(session.config, "workerinput"):
        return
    if exitstatus == 0:
        shutil.rmtree(made, ignore_errors=True)
    else:
        print(f"\ntest folders kept for a look: {made}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide Llama with a 300-token BPE tokenizer, saved as a local HF model folder."""
    from tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"), TOKENIZER_CORPUS)


@pytest.fixture()
def two_tasks(tmp_path) -> list[Path]:
    return [write_dialogue(tmp_path / "guest_a.csv", "Guest A", 60, 1),
            write_dialogue(tmp_path / "guest_b.csv", "Guest B", 40, 2)]


@pytest.fixture()
def tiny_config(tiny_model_dir, two_tasks, tmp_path):
    """Factory: tiny_config(strategy, **overrides) → a validated RunConfig."""
    from cltune.api import make_config

    def make(strategy: str = "naive", sets: list[str] | None = None, **extra):
        return make_config(tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", strategy, **extra), sets)

    return make


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
def fast_runs(one_thread):
    """For a module of in-process runs (`pytestmark = pytest.mark.usefixtures("fast_runs")`): one intra-op thread
    (`one_thread`), and no EDA plots (a second a run, and what they show is tested in test_eda.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("cltune.studies.pipeline.write_eda", lambda *args, **kwargs: None)
        yield


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    """A module's folder for the tiny stream's data and runs (`stream_config`)."""
    return tmp_path_factory.mktemp("stream")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, stream):
    """An uninterrupted in-process run of the tiny ewc_replay stream (replay buffer and Fisher state) with step
    checkpoints every 2 steps, in stream/runs/reference: what resumed and faulted runs must equal."""
    from cltune.api import make_config
    from cltune.studies.pipeline import run_stream

    return run_stream(make_config(stream_config(tiny_model_dir, stream, name="reference", checkpoint_every=2)))


@pytest.fixture(scope="session")
def strategy_streams(tiny_model_dir, tmp_path_factory):
    """`streams(strategy)` → (raw config, RunMetrics) of the uninterrupted tiny stream on whole conversations
    (`context_turns: all`, windows of 48 tokens: every hook then sees examples with context, in windows that
    slide where a conversation is longer), run once per strategy per session and shared by the end-to-end test,
    which also resumes against it, and the tests that read a finished run."""
    from cltune.api import make_config
    from cltune.studies.pipeline import run_stream

    folder, cache = tmp_path_factory.mktemp("streams"), {}

    def streams(strategy: str):
        if strategy not in cache:
            # a step checkpoint after every step, three steps a phase: resume tests stop and continue inside a phase
            raw = stream_config(tiny_model_dir, folder, strategy, f"{strategy}-uninterrupted", context_turns="all",
                                checkpoint_every=1, max_steps=3)
            cache[strategy] = (raw, run_stream(make_config(raw)))
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


@pytest.fixture()
def cli(monkeypatch, capsys):
    """`cli(*argv)` runs `cltune ARGV` in this process through the console script's entry point."""
    return lambda *argv: run_cli(monkeypatch, capsys, *argv)
