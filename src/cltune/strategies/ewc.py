"""`ewc`: Elastic Weight Consolidation on the trainable (LoRA and new-token) parameters.

After each phase the diagonal empirical Fisher — the mean over utterances of the squared gradient
of each utterance's log-likelihood (summed over its target tokens; the sum, not the mean: the Fisher of
a sequence is the expected squared score of its log-likelihood, and squaring the gradient of the mean
shrank it by the squared length, ≈ 20² for a chat turn, which made the reference pipeline's λ = 10 a no-op) — is
estimated, from batched passes (`cltune.modeling.per_example`), on that task's
replay sample (the reference pipeline's choice; `fisher_data: train` uses the whole training split) and θ* is
kept. Later phases
add  λ · Σ_tasks Σ_i F_i (θ_i − θ*_i)²  — no ½ factor. `mode: separate` keeps one (F, θ*) per
earlier task and sums their penalties; `mode: online` keeps one running F ← γ·F + F_new with
θ* the latest weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field

from cltune.config import Strict
from cltune.data.split import Example, TaskData
from cltune.errors import UserError
from cltune.modeling.per_example import per_example_grads
from cltune.strategies.base import Strategy
from cltune.strategies.replay import ReplaySettings, replay_sample
from cltune.strategies.shared import Tensors


class EWCSettings(Strict):
    lambda_: float = Field(10.0, alias="lambda", ge=0, description="penalty strength λ")
    fisher_data: Literal["replay", "train"] = Field(
        "replay", description="Fisher on the replay sample or the whole train split")
    mode: Literal["separate", "online"] = Field(
        "separate", description="one penalty per earlier task, or one running Fisher")
    gamma: float = Field(1.0, ge=0, le=1, description="decay of the running Fisher in online mode")


def fisher_diagonal(per_example_grads: Iterable[Tensors]) -> Tensors:
    """Mean over examples of the squared gradient, parameter by parameter."""
    total: Tensors = {}
    n = 0
    for grads in per_example_grads:
        n += 1
        for name, g in grads.items():
            sq = g.detach().double() ** 2
            total[name] = total[name] + sq if name in total else sq
    if n == 0:
        raise ValueError("fisher_diagonal needs at least one example")
    return {name: (v / n).float() for name, v in total.items()}


def ewc_penalty(params: Tensors, anchors: list[tuple[Tensors, Tensors]], lam: float) -> torch.Tensor:
    """λ · Σ over anchors (θ*, F) of Σ_i F_i (θ_i − θ*_i)²."""
    device = next(iter(params.values())).device
    penalty = torch.zeros((), device=device)
    for theta_star, fisher in anchors:
        for name, f in fisher.items():
            penalty = penalty + (f * (params[name] - theta_star[name]) ** 2).sum()
    return lam * penalty


class EWC(Strategy):
    name = "ewc"
    summary = "Elastic Weight Consolidation: quadratic penalty weighted by the diagonal Fisher of earlier tasks"
    sections = {"ewc": EWCSettings, "replay": ReplaySettings}
    phase1_neutral = True

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.cfg: EWCSettings = settings["ewc"]
        if self.cfg.fisher_data == "replay" and settings["replay"].ratio == 0:
            raise UserError("ewc.fisher_data: replay estimates the Fisher on the replay sample, but replay.ratio is 0; "
                            "set ewc.fisher_data: train, or a replay.ratio above 0")
        self.anchors: list[tuple[Tensors, Tensors]] = []

    def fisher_examples(self, task: TaskData) -> list[Example]:
        if self.cfg.fisher_data == "train":
            return task.train
        replay = self.settings["replay"]
        return replay_sample(task.train, replay.ratio, self.ctx.seed + task.index, replay.max_per_task)

    def after_task(self, task: TaskData) -> None:
        fisher = fisher_diagonal(per_example_grads(self.ctx, self.fisher_examples(task)))
        theta = {n: p.detach().clone() for n, p in self.ctx.trainable().items()}
        if self.cfg.mode == "online" and self.anchors:
            old = self.anchors[0][1]
            fisher = {n: self.cfg.gamma * old[n] + f for n, f in fisher.items()}
            self.anchors = []
        self.anchors.append((theta, fisher))

    def step_penalty(self, step):
        if not self.anchors or self.cfg.lambda_ == 0:
            return None
        return ewc_penalty(self.ctx.trainable(), self.anchors, self.cfg.lambda_)

    def state(self):
        out = {}
        for k, (theta, fisher) in enumerate(self.anchors):
            out.update({f"{k}.theta.{n}": t for n, t in theta.items()})
            out.update({f"{k}.fisher.{n}": t for n, t in fisher.items()})
        return out

    def load_state(self, state):
        count = len({k.split(".", 1)[0] for k in state})
        self.anchors = []
        for k in range(count):
            theta = {n[len(f"{k}.theta."):]: t for n, t in state.items() if n.startswith(f"{k}.theta.")}
            fisher = {n[len(f"{k}.fisher."):]: t for n, t in state.items() if n.startswith(f"{k}.fisher.")}
            self.anchors.append((theta, fisher))


STRATEGY = EWC
