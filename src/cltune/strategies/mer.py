"""`mer`: meta-experience replay (after Riemer et al. 2019) — Reptile meta-updates over steps that mix the new
dataset with a replay buffer, in every phase.

`replay`'s seeded sample of each finished dataset is shuffled into later phases. The trainable weights θ
at the start of every window of `meta_every` optimizer steps are kept; when the window ends,
θ ← θ_start + γ·(θ − θ_start): the ordinary steps are the inner loop, and the meta step keeps the part
of their movement they agree on, which favours directions good for new and replayed utterances alike
(the paper's across-batch meta-update). γ = 1 is `replay` itself. A window never spans two phases, and
a phase's last window may be shorter.

Unlike `reptile`, which meta-trains the starting point once before phase 1 and does nothing afterwards,
this acts during every phase; both are kept (`reptile` is the reference pipeline's, measured in
docs/benchmarks/strategies.md).
"""

from __future__ import annotations

import torch
from pydantic import Field

from cltune.config import Strict
from cltune.data.split import Example, TaskData
from cltune.strategies.base import Costs, StepInfo, Strategy
from cltune.strategies.replay import ReplayBuffer, ReplaySettings
from cltune.strategies.shared import Tensors, unprefixed


class MERSettings(Strict):
    ratio: float = Field(0.1, ge=0, le=1, description="share of each earlier dataset's training utterances replayed")
    meta_every: int = Field(5, ge=1, description="optimizer steps per meta-update window")
    gamma: float = Field(0.5, gt=0, le=1, description="meta step size γ: the share of a window's movement kept")


def meta_update(start: Tensors, now: Tensors, gamma: float) -> Tensors:
    """θ_start + γ·(θ − θ_start), parameter by parameter."""
    return {name: start[name] + gamma * (now[name] - start[name]) for name in start}


class MER(Strategy):
    name = "mer"
    summary = ("meta-experience replay: 10% replay, and every 5 steps keep half of the window's movement "
               "(Reptile, γ=0.5)")
    sections = {"mer": MERSettings}

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.cfg: MERSettings = settings["mer"]
        self.buffer = ReplayBuffer(ReplaySettings(ratio=self.cfg.ratio), ctx.seed)
        self.start: Tensors = {}  # θ at the start of the running window
        self.meta_updates = 0

    def before_task(self, task: TaskData, *, resumed: bool = False) -> None:
        self.start, self.meta_updates = self._snapshot(), 0  # a resumed phase gets its window back from the state

    def _snapshot(self) -> Tensors:
        return {n: p.detach().clone() for n, p in self.ctx.trainable().items()}

    def train_data(self, task: TaskData) -> list[Example]:
        return task.train + self.buffer.examples()

    def after_step(self, step: StepInfo) -> None:
        if step.step % self.cfg.meta_every and step.step != step.steps:
            return
        params = self.ctx.trainable()
        if self.cfg.gamma != 1:  # γ = 1 keeps θ as it is (θ_start + (θ − θ_start) would round)
            with torch.no_grad():
                for name, value in meta_update(self.start, {n: p.detach() for n, p in params.items()},
                                               self.cfg.gamma).items():
                    params[name].copy_(value)
        self.meta_updates += 1
        self.start = self._snapshot()  # the next window starts here

    def after_task(self, task: TaskData) -> Costs:
        self.buffer.add(task)
        return {"stored_utterances": len(self.buffer.examples()), "meta_updates": self.meta_updates}

    def state(self):
        out = {f"start.{n}": t for n, t in self.start.items()}
        out.update(self.buffer.to_state(self.ctx.tasks))
        out["meta_updates"] = torch.tensor([self.meta_updates], dtype=torch.long)
        return out

    def load_state(self, state):
        self.start = unprefixed(state, "start.", self.ctx.trainable())
        self.buffer.load(state, self.ctx.tasks)
        if "meta_updates" in state:
            self.meta_updates = int(state["meta_updates"][0])


STRATEGY = MER
