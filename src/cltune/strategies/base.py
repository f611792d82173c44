"""The strategy protocol (v2): a few hooks around one training loop, and a router for inference.

A strategy never reaches into the loop: it returns data, losses and a router, and may adjust
gradients after backward. Per phase the pipeline calls, in order:

    before_task(task, resumed=…)            set up (add an adapter, sample pseudo-data); returns costs
    train_data(task)      once, cached      the utterances to train on
    per optimizer step (StepInfo):
        batch_loss(batch, outputs, step)    per micro-batch, weighted by its share of target tokens
        step_penalty(step)                  once, added to the step's loss (EWC, SI, O-LoRA penalties)
        after_backward(step)                the full gradient in place (A-GEM's projection)
        after_step(step)                    the weights moved (SI's path integral)
    after_task(task)                        consolidate (Fisher, memory, merging); returns costs

Evaluation, the report's samples and `cltune generate` ask `router()` which weights answer:
`oracle(task_index)` when the task id is known, `agnostic(token)` when only the speaker is.
`state()` and `modules()` are saved with every checkpoint (safetensors) and restored on resume.
The two task hooks return the extra work they did (`Costs`: stored utterances, generation time, …);
the pipeline writes it into the phase's record in metrics.json.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from pydantic import BaseModel

from cltune.data.split import Example, TaskData
from cltune.modeling.batching import Batch, encode


@dataclass
class Context:
    """What a strategy may use: the model (PEFT), its scorer, the tokenizer, tasks and settings."""

    accelerator: Accelerator
    model: Any  # peft.PeftModel
    scorer: Any  # cltune.modeling.scoring.TokenScorer
    tokenizer: Any
    tasks: list[TaskData]
    max_length: int
    seed: int
    run_dir: Path | None = None
    new_token_ids: list[int] = field(default_factory=list)  # [PAD] and speaker tokens added to the vocabulary
    lora: Any = None  # cltune.config.LoraSettings, for strategies that add adapters
    base_dtype: torch.dtype = torch.float32  # frozen base weights' dtype (bf16 runs); trained weights are fp32
    eval_batch_size: int = 32  # utterances per evaluation forward (validation in the loop as after it)

    def encode(self, examples: list[Example]) -> list[list[int]]:
        return encode(examples, self.tokenizer, self.max_length)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class StepInfo:
    """Where the loop is: 0-based phase, 1-based optimizer step of `steps`, 0-based epoch."""

    phase: int
    step: int
    steps: int
    epoch: int


@dataclass
class Outputs:
    """The scorer's outputs at a micro-batch's target positions (row-major over the batch)."""

    logits: torch.Tensor  # (targets, vocab)
    hidden: torch.Tensor | None = None  # (targets, width) last hidden states, when the strategy asks for them


class Router:
    """Which weights answer: for a task when its id is known (`oracle`), for a speaker token when
    only that is known (`agnostic`, what a user of a saved model has). This default has one model."""

    kind: ClassVar[str] = "single"
    # True when the weights depend on the task: evaluation then also reports agnostic rows, routed by
    # speaker token alone, beside the oracle rows that are given the task id.
    task_routed: ClassVar[bool] = False

    def oracle(self, task_index: int) -> AbstractContextManager:
        return nullcontext()

    def agnostic(self, token: str) -> AbstractContextManager:
        return nullcontext()

    def agnostic_choices(self, token: str) -> list[AbstractContextManager]:
        """The candidate weights for a speaker token when several could serve it (a speaker several tasks
        share): scoring mixes them with equal priors. Most speakers have one: `agnostic(token)`."""
        return [weights for _, weights in self.named_choices(token)]

    def named_choices(self, token: str) -> list[tuple[str | None, AbstractContextManager]]:
        """`agnostic_choices` with a name for each candidate: the same name as `oracle_name` of a task means the
        same weights, so evaluation reuses what the oracle row scored (None: a name that matches nothing)."""
        return [(None, self.agnostic(token))]

    def oracle_name(self, task_index: int) -> str | None:
        """The name of the weights `oracle(task_index)` serves (see `named_choices`); None: unnamed."""
        return None

    def weights_fingerprint(self, name: str) -> str | None:
        """A digest of the weights `name` stands for now: a later matrix row reuses what an earlier one scored by
        weights of the same digest (a frozen column). None: never reused across rows."""
        return None

    def to_json(self) -> dict:
        """Saved in every checkpoint as router.json, so `generate` routes as evaluation did."""
        return {"kind": self.kind}


# The extra work a task hook did, as `name: number` (metrics.json: the phase record's `strategy`).
Costs = dict[str, float]


class Strategy:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # Config sections whose settings it reads, with their models: {"ewc": EWCSettings, ...}.
    sections: ClassVar[dict[str, type[BaseModel]]] = {}
    # True when phase 1 trains exactly like `naive`, so a sweep may reuse one phase-1 checkpoint. Opt-in:
    # a strategy that claims it is held to it (the end-to-end test compares its phase 1 with naive's).
    phase1_neutral: ClassVar[bool] = False
    # True when batch_loss needs the last hidden states at target positions.
    wants_hidden_states: ClassVar[bool] = False

    def __init__(self, ctx: Context, settings: dict[str, BaseModel]):
        self.ctx = ctx
        self.settings = settings

    def whole_rows(self) -> bool:
        """True when this phase's batch_loss reads what hooks recorded at every position of the forward pass: each
        row is then computed in one call, never with a window's lead apart (`train.window_lead_grad`)."""
        return False

    def before_task(self, task: TaskData, *, resumed: bool = False) -> Costs | None:
        """Called before training on `task` (e.g. add an adapter, sample pseudo-data); returns its costs.
        `resumed`: the phase continues from a step checkpoint, which restores the trained weights and the
        strategy's state, so set-up work whose only product is those may be skipped (the costs the
        interrupted process recorded are kept)."""
        return None

    def train_data(self, task: TaskData) -> list[Example]:
        """The examples to train on during this task's phase; called once per phase, after before_task."""
        return task.train

    def shared_budget(self) -> bool:
        """True when the utterances `train_data` adds (replayed ones) share the new data's step budget: the
        phase then takes as many optimizer steps as the task's own training split would, not more."""
        return False

    def batch_loss(self, batch: Batch, outputs: Outputs, step: StepInfo) -> torch.Tensor | None:
        """A loss per target token of this micro-batch, added to its mean token NLL (distillation)."""
        return None

    def step_penalty(self, step: StepInfo) -> torch.Tensor | None:
        """A loss added once to the optimizer step's loss (a penalty on the parameters)."""
        return None

    def after_backward(self, step: StepInfo) -> None:
        """Called once per optimizer step with the full gradients in place (gradient surgery)."""

    def after_step(self, step: StepInfo) -> None:
        """Called after each optimizer step (e.g. path integrals)."""

    def after_task(self, task: TaskData) -> Costs | None:
        """Called after training on `task` (e.g. Fisher, memory, merging); returns its costs."""
        return None

    def router(self) -> Router:
        return Router()

    def starts_as(self, task: TaskData) -> str | None:
        """After `before_task(task)`: the router's name for weights whose function the model now computes for
        `task` (a new adapter or column that starts as a copy of them, to float rounding), so the phase's start
        figures may reuse what the last matrix row scored by those weights. None: nothing to reuse."""
        return None

    def modules(self) -> dict[str, torch.nn.Module]:
        """Trainable modules of the strategy's own (a fusion gate): trained with the model's weights,
        saved with every checkpoint as safetensors and restored on resume."""
        return {}

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors that must survive a restart (saved as safetensors)."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state` returned."""

    def full_state(self) -> dict[str, torch.Tensor]:
        """`state()` and every module's weights (under `module.NAME.`): what a checkpoint saves."""
        out = dict(self.state())
        for name, module in self.modules().items():
            out.update({f"module.{name}.{k}": v.detach() for k, v in module.state_dict().items()})
        return out

    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, module in self.modules().items():
            weights = module_weights(state, name)
            if weights:
                module.load_state_dict(weights)
        self.load_state({k: v for k, v in state.items() if not k.startswith("module.")})


def weights_digest(named: Iterable[tuple[str, torch.Tensor]], header: str = "") -> str:
    """A digest of `header` and named tensors' names and exact values."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(header.encode())
    for name, tensor in named:
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def under(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `state` whose key starts with `prefix`, with the prefix taken off."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def module_weights(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """A strategy module's weights in a saved `full_state()` (a router rebuilding the module reads them too)."""
    return under(state, f"module.{name}.")


def _sum(terms) -> torch.Tensor | None:
    present = [t for t in terms if t is not None]
    return sum(present) if present else None


def _merged(costs) -> Costs | None:
    """Several hooks' costs as one (a later member's figure wins over an earlier one's of the same name)."""
    out: Costs = {}
    for c in costs:
        out.update(c or {})
    return out or None


class Composite(Strategy):
    """Several strategies as one: every member's data, losses, hooks, costs and state; at most one routes."""

    parts: ClassVar[tuple[type[Strategy], ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.parts:
            cls.sections = {k: v for part in cls.parts for k, v in part.sections.items()}
            cls.phase1_neutral = all(part.phase1_neutral for part in cls.parts)
            cls.wants_hidden_states = any(part.wants_hidden_states for part in cls.parts)

    def __init__(self, ctx: Context, settings: dict[str, BaseModel]):
        super().__init__(ctx, settings)
        self.members = [part(ctx, {k: settings[k] for k in part.sections}) for part in self.parts]
        routing = [m for m in self.members if type(m).router is not Strategy.router]
        if len(routing) > 1:
            raise ValueError(f"{self.name}: {[m.name for m in routing]} each route inference; combine at most one")
        self._routing = routing[0] if routing else None

    def whole_rows(self):
        return any(m.whole_rows() for m in self.members)

    def before_task(self, task, *, resumed=False):
        return _merged(m.before_task(task, resumed=resumed) for m in self.members)

    def train_data(self, task):
        """The task's utterances, then what each member adds (replayed, generated), each utterance once."""
        out, seen = list(task.train), set(task.train)
        for m in self.members:
            added = [e for e in m.train_data(task) if e not in seen]
            out += added
            seen.update(added)
        return out

    def shared_budget(self):
        return any(m.shared_budget() for m in self.members)

    def batch_loss(self, batch, outputs, step):
        return _sum(m.batch_loss(batch, outputs, step) for m in self.members)

    def step_penalty(self, step):
        return _sum(m.step_penalty(step) for m in self.members)

    def after_backward(self, step):
        for m in self.members:
            m.after_backward(step)

    def after_step(self, step):
        for m in self.members:
            m.after_step(step)

    def after_task(self, task):
        return _merged(m.after_task(task) for m in self.members)

    def router(self):
        return self._routing.router() if self._routing else Router()

    def modules(self):
        return {f"{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.modules().items()}

    def state(self):
        return {f"{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.state().items()}

    def load_state(self, state):
        for i, m in enumerate(self.members):
            m.load_state(under(state, f"{i}."))
