"""`replay`: keep a seeded sample of each earlier dataset's training utterances and mix it into
every later phase (shuffled in with the new data, not appended)."""

from __future__ import annotations

import random

import torch
from pydantic import Field

from cltune.config import Strict
from cltune.data.split import Example, TaskData, require_no_test
from cltune.strategies.base import Strategy


class ReplaySettings(Strict):
    ratio: float = Field(0.1, ge=0, le=1, description="share of each earlier dataset's training utterances kept")
    max_per_task: int | None = Field(None, ge=1, description="cap on utterances kept per dataset")


def replay_sample(train: list[Example], ratio: float, seed: int, cap: int | None = None) -> list[Example]:
    """A seeded sample of `ratio` of a training split (at least one utterance when ratio > 0)."""
    examples = require_no_test(train, "the replay buffer")
    if ratio <= 0 or not examples:
        return []
    k = max(1, round(ratio * len(examples)))
    if cap:
        k = min(k, cap)
    return random.Random(seed).sample(examples, k)


class ReplayBuffer:
    """Per-task samples of earlier training data; the same sample serves replay and Fisher."""

    def __init__(self, settings: ReplaySettings, seed: int):
        self.settings, self.seed = settings, seed
        self.samples: dict[int, list[Example]] = {}

    def add(self, task: TaskData) -> list[Example]:
        self.samples[task.index] = replay_sample(task.train, self.settings.ratio, self.seed + task.index, self.settings.max_per_task)
        return self.samples[task.index]

    def examples(self) -> list[Example]:
        return [e for i in sorted(self.samples) for e in self.samples[i]]


class Replay(Strategy):
    name = "replay"
    summary = "mix a seeded 10% sample of each earlier dataset's training utterances into later phases"
    sections = {"replay": ReplaySettings}

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.buffer = ReplayBuffer(settings["replay"], ctx.seed)

    def train_data(self, task: TaskData) -> list[Example]:
        return task.train + self.buffer.examples()

    def after_task(self, task: TaskData) -> None:
        self.buffer.add(task)
        self.costs[task.index + 1] = {"stored_utterances": len(self.buffer.examples())}

    def state(self):
        # The buffer as positions in each task's training split, so `cltune run --resume` replays the same utterances.
        return {f"buffer.{i}": torch.tensor(positions(self.ctx.tasks[i].train, kept), dtype=torch.long)
                for i, kept in self.buffer.samples.items()}

    def load_state(self, state):
        self.buffer.samples = {int(k.split(".")[1]): [self.ctx.tasks[int(k.split(".")[1])].train[j] for j in v.tolist()]
                               for k, v in state.items() if k.startswith("buffer.")}


def positions(examples: list[Example], chosen: list[Example]) -> list[int]:
    """Where each chosen example sits in `examples` (examples are distinct: each has its own line)."""
    index = {e: i for i, e in enumerate(examples)}
    return [index[e] for e in chosen]


STRATEGY = Replay
