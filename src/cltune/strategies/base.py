"""The strategy interface: a few hooks around one training loop.

A strategy never reaches into the loop. It returns the data to train on and an extra loss, and
may adjust gradients after backward; everything else (sampling, Fisher, teachers) it keeps itself.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from pydantic import BaseModel

from cltune.batching import Batch, encode
from cltune.data.split import Example, TaskData


@dataclass
class Context:
    """What a strategy may use: the model (PEFT), its scorer, the tokenizer, tasks and settings."""

    accelerator: Accelerator
    model: Any  # peft.PeftModel
    scorer: Any  # cltune.scoring.TokenScorer
    tokenizer: Any
    tasks: list[TaskData]
    max_length: int
    seed: int
    run_dir: Path | None = None
    new_token_ids: list[int] = field(default_factory=list)  # [PAD] and speaker tokens added to the vocabulary
    lora: Any = None  # cltune.config.LoraSettings, for strategies that add adapters

    def encode(self, examples: list[Example]) -> list[list[int]]:
        return encode(examples, self.tokenizer, self.max_length)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


class Strategy:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    sections: ClassVar[tuple[str, ...]] = ()  # config sections whose settings it reads
    # True when phase 1 trains exactly like `naive`, so a sweep may reuse one phase-1 checkpoint.
    phase1_neutral: ClassVar[bool] = True

    def __init__(self, ctx: Context, settings: dict[str, BaseModel]):
        self.ctx = ctx
        self.settings = settings
        self.costs: dict[int, dict] = {}  # by phase number: extra work worth reporting (metrics.json shows it)

    def before_task(self, task: TaskData) -> None:
        """Called before training on `task` (e.g. add an adapter, sample pseudo-data)."""

    def train_data(self, task: TaskData) -> list[Example]:
        """The examples to train on during this task's phase."""
        return task.train

    def extra_loss(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor | None:
        """A loss added to the micro-batch's mean token NLL (a penalty, a distillation term)."""
        return None

    def after_backward(self) -> None:
        """Called once per optimizer step with the full gradients in place (gradient surgery)."""

    def after_step(self) -> None:
        """Called after each optimizer step (e.g. path integrals)."""

    def after_task(self, task: TaskData) -> None:
        """Called after training on `task` (e.g. Fisher, memory, merging)."""

    def evaluating(self, task_index: int) -> AbstractContextManager:
        """Context in which task `task_index` is evaluated (e.g. with that task's own adapter)."""
        return nullcontext()

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that must survive a restart (saved as safetensors)."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state` returned."""


class Composite(Strategy):
    """Runs several strategies' hooks in order; the first part supplies the training data."""

    parts: ClassVar[tuple[type[Strategy], ...]] = ()

    def __init__(self, ctx: Context, settings: dict[str, BaseModel]):
        super().__init__(ctx, settings)
        self.members = [part(ctx, settings) for part in self.parts]

    def before_task(self, task):
        for m in self.members:
            m.before_task(task)

    def train_data(self, task):
        return self.members[0].train_data(task)

    def extra_loss(self, batch, logits):
        terms = [t for t in (m.extra_loss(batch, logits) for m in self.members) if t is not None]
        return sum(terms) if terms else None

    def after_backward(self):
        for m in self.members:
            m.after_backward()

    def after_step(self):
        for m in self.members:
            m.after_step()

    def after_task(self, task):
        for m in self.members:
            m.after_task(task)

    def state(self):
        return {f"{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.state().items()}

    def load_state(self, state):
        for i, m in enumerate(self.members):
            prefix = f"{i}."
            m.load_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
