"""`replay`: keep a sample of each earlier dataset's training utterances and mix it into every later
phase (shuffled in with the new data, not appended).

Which utterances are kept (`selection`):
- `random`: a seeded uniform sample of `ratio` of each finished dataset (the reference pipeline's choice);
- `highest_loss`: the same number, the utterances with the highest mean token NLL under the model at the
  end of their phase (the ones it found hardest; one scoring pass over the training split);
- `reservoir`: one buffer of fixed size for the whole stream (`capacity`, default `ratio` × the first
  dataset's training utterances), filled by reservoir sampling over every training utterance seen so far,
  so each earlier dataset's share shrinks as more arrive (memory stays constant however long the stream).
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
from pydantic import Field

from cltune.config import Strict
from cltune.data.split import Example, TaskData, require_no_test
from cltune.evaluation.evaluate import example_nll
from cltune.strategies.base import Costs, Strategy


class ReplaySettings(Strict):
    ratio: float = Field(0.1, ge=0, le=1, description="share of each earlier dataset's training utterances kept")
    max_per_task: int | None = Field(None, ge=1, description="cap on utterances kept per dataset")
    selection: Literal["random", "highest_loss", "reservoir"] = Field(
        "random",
        description="which utterances are kept: a seeded sample, the highest-NLL ones, or a fixed-size reservoir")
    capacity: int | None = Field(
        None, ge=1, description="reservoir: total utterances kept (default: ratio × the first dataset's)")
    budget: Literal["added", "shared"] = Field(
        "added",
        description="added: replayed utterances lengthen the phase (an epoch covers new and replayed); shared: "
                    "the phase takes the steps the new data alone would, replayed utterances taking new ones' places")


def replay_sample(train: list[Example], ratio: float, seed: int, cap: int | None = None) -> list[Example]:
    """A seeded sample of `ratio` of a training split (at least one utterance when ratio > 0). With whole
    conversations (`context_turns: all`) it takes whole windows in seeded order, the last one cut to the count,
    so a replayed window is computed once for all of its targets instead of once per target."""
    examples = require_no_test(train, "the replay buffer")
    if ratio <= 0 or not examples:
        return []
    k = max(1, round(ratio * len(examples)))
    if cap:
        k = min(k, cap)
    if not any(e.window for e in examples):
        return random.Random(seed).sample(examples, k)
    windows: dict[object, list[Example]] = {}
    for i, example in enumerate(examples):
        windows.setdefault(example.window or i, []).append(example)
    order = list(windows)
    random.Random(seed).shuffle(order)
    return [e for key in order for e in windows[key]][:k]


def highest_loss(train: list[Example], losses: list[float], ratio: float, cap: int | None = None) -> list[Example]:
    """As many utterances as `replay_sample` keeps, those with the highest `losses` (ties: earlier first), in
    their order in `train`."""
    examples = require_no_test(train, "the replay buffer")
    if ratio <= 0 or not examples:
        return []
    k = max(1, round(ratio * len(examples)))
    k = min(k, cap) if cap else k
    chosen = sorted(sorted(range(len(examples)), key=lambda i: -losses[i])[:k])
    return [examples[i] for i in chosen]


class ReplayBuffer:
    """Per-task samples of earlier training data; the same sample serves replay and Fisher."""

    def __init__(self, settings: ReplaySettings, seed: int):
        self.settings, self.seed = settings, seed
        self.samples: dict[int, list[Example]] = {}
        self.seen = 0  # training utterances offered so far (reservoir sampling)
        self.capacity: int | None = None  # the reservoir's size, fixed by the first dataset unless set

    def add(self, task: TaskData, losses: list[float] | None = None) -> list[Example]:
        """Keep part of `task`'s training split (`losses`: each utterance's mean NLL, for `highest_loss`)."""
        settings = self.settings
        if settings.selection == "highest_loss":
            if losses is None:
                raise ValueError("replay.selection highest_loss needs the utterances' losses")
            self.samples[task.index] = highest_loss(task.train, losses, settings.ratio, settings.max_per_task)
        elif settings.selection == "reservoir":
            self._reservoir(task)
        else:
            self.samples[task.index] = replay_sample(task.train, settings.ratio, self.seed + task.index,
                                                     settings.max_per_task)
        return self.samples.get(task.index, [])

    def _reservoir(self, task: TaskData) -> None:
        """Algorithm R over the stream of training utterances, seeded per task: a buffer of `capacity` in
        which every utterance seen so far is equally likely to be."""
        examples = require_no_test(task.train, "the replay buffer")
        if self.capacity is None:  # the default is set by the first dataset
            self.capacity = self.settings.capacity or max(1, math.ceil(self.settings.ratio * len(examples)))
        slots = [e for i in sorted(self.samples) for e in self.samples[i]]
        rng = random.Random(f"{self.seed}|reservoir|{task.index}")
        for example in examples:
            self.seen += 1
            if len(slots) < self.capacity:
                slots.append(example)
            elif (j := rng.randrange(self.seen)) < self.capacity:
                slots[j] = example
        kept = set(slots)
        earlier = {i: [e for e in v if e in kept] for i, v in self.samples.items()}
        self.samples = {i: v for i, v in {**earlier, task.index: [e for e in examples if e in kept]}.items() if v}

    def to_state(self, tasks: list[TaskData]) -> dict[str, torch.Tensor]:
        """The buffer as positions in each task's training split (so a resumed run replays the same
        utterances), and the reservoir's counters."""
        out = {f"buffer.{i}": torch.tensor(positions(tasks[i].train, kept), dtype=torch.long)
               for i, kept in self.samples.items()}
        if self.capacity is not None:
            out["reservoir"] = torch.tensor([self.seen, self.capacity], dtype=torch.long)
        return out

    def load(self, state: dict[str, torch.Tensor], tasks: list[TaskData]) -> None:
        """Restore what `to_state` returned (other keys of `state` are ignored)."""
        self.samples = {int(k.split(".")[1]): [tasks[int(k.split(".")[1])].train[j] for j in v.tolist()]
                        for k, v in state.items() if k.startswith("buffer.")}
        if "reservoir" in state:
            self.seen, self.capacity = state["reservoir"].tolist()

    def examples(self) -> list[Example]:
        return [e for i in sorted(self.samples) for e in self.samples[i]]


class Replay(Strategy):
    name = "replay"
    summary = "mix a seeded 10% sample of each earlier dataset's training utterances into later phases"
    sections = {"replay": ReplaySettings}
    phase1_neutral = True

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.buffer = ReplayBuffer(settings["replay"], ctx.seed)

    def train_data(self, task: TaskData) -> list[Example]:
        return task.train + self.buffer.examples()

    def shared_budget(self) -> bool:
        return self.buffer.settings.budget == "shared"

    def after_task(self, task: TaskData) -> Costs:
        losses = utterance_losses(self.ctx, task.train) if self.buffer.settings.selection == "highest_loss" else None
        self.buffer.add(task, losses)
        return {"stored_utterances": len(self.buffer.examples())}

    def state(self):
        return self.buffer.to_state(self.ctx.tasks)

    def load_state(self, state):
        self.buffer.load(state, self.ctx.tasks)


def utterance_losses(ctx, examples: list[Example]) -> list[float]:
    """Each utterance's mean target-token NLL under the current model (evaluation settings)."""
    total, count = example_nll(ctx.accelerator, ctx.scorer, ctx.encode(examples), ctx.tokenizer.pad_token_id,
                               ctx.eval_batch_size)
    return (total / count.clamp(min=1)).tolist()


def positions(examples: list[Example], chosen: list[Example]) -> list[int]:
    """Where each chosen example sits in `examples` (examples are distinct: each has its own line)."""
    index = {e: i for i, e in enumerate(examples)}
    return [index[e] for e in chosen]


STRATEGY = Replay
