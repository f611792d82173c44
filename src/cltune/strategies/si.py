"""`si`: Synaptic Intelligence (Zenke et al. 2017) on the trainable (LoRA and new-token) parameters.

During each phase every optimizer step adds  ω_i −= g_i · Δθ_i,  the step's first-order share of
the drop in the task loss. At the end of the phase  Ω_i += ω_i / ((θ_end − θ_start)_i² + ξ)  and
θ* = θ_end; later phases add  c · Σ_i Ω_i (θ_i − θ*_i)²  (no ½ factor, like `ewc`).

g is the gradient of the task loss as the loop leaves it after backward: summed over the step's
micro-batches, averaged across processes, fp16 loss scaling undone, *before* gradient clipping
(the loop clips after `after_backward`), and without SI's own penalty gradient 2cΩ(θ − θ*),
which is subtracted so that ω credits parameters for the new task's loss only, as in the paper.
A strategy combined with SI would still see its own extra losses counted in g.
"""

from __future__ import annotations

import torch
from pydantic import Field

from cltune.config import Strict
from cltune.data.split import TaskData
from cltune.strategies.base import Strategy
from cltune.strategies.shared import Tensors, unprefixed


class SISettings(Strict):
    c: float = Field(0.1, ge=0, description="penalty strength c")
    xi: float = Field(1e-3, gt=0, description="damping ξ in the importance denominator (Δθ² + ξ)")


def path_integral_step(omega: Tensors, grads: Tensors, before: Tensors, after: Tensors) -> Tensors:
    """ω − g·(θ_after − θ_before), parameter by parameter."""
    return {n: omega[n] - grads[n] * (after[n] - before[n]) for n in omega}


def consolidate(importance: Tensors, omega: Tensors, start: Tensors, end: Tensors, xi: float) -> Tensors:
    """Ω + max(0, ω / ((θ_end − θ_start)² + ξ)), parameter by parameter (Ω missing = zeros).

    The clamp is ours, not the paper's: with Adam some coordinates end a phase with ω < 0 (their
    motion raised the loss); a negative Ω would make the quadratic penalty concave there, reward
    drifting away from θ*, and leave the loss unbounded below. Such a coordinate counts as unimportant.
    """
    out = dict(importance)
    for n, w in omega.items():
        gained = (w / ((end[n] - start[n]) ** 2 + xi)).clamp_min(0)
        out[n] = out[n] + gained if n in out else gained
    return out


def si_penalty(params: Tensors, anchor: Tensors, importance: Tensors, c: float) -> torch.Tensor:
    """c · Σ_i Ω_i (θ_i − θ*_i)²."""
    device = next(iter(params.values())).device
    penalty = torch.zeros((), device=device)
    for n, omega in importance.items():
        penalty = penalty + (omega * (params[n] - anchor[n]) ** 2).sum()
    return c * penalty


def si_penalty_grad(params: Tensors, anchor: Tensors, importance: Tensors, c: float) -> Tensors:
    """The gradient of `si_penalty`: 2c · Ω (θ − θ*)."""
    return {n: 2 * c * omega * (params[n].detach() - anchor[n]) for n, omega in importance.items()}


def _snapshot(params: Tensors) -> Tensors:
    return {n: p.detach().clone() for n, p in params.items()}


class SI(Strategy):
    name = "si"
    summary = "Synaptic Intelligence: quadratic penalty weighted by each parameter's path-integral importance (c=0.1)"
    sections = {"si": SISettings}
    # The importance comes from phase 1's optimizer steps; a reused phase-1 adapter has none.
    _SAVED = ("importance", "anchor", "omega", "start")  # the attributes state() saves

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.cfg: SISettings = settings["si"]
        self.importance: Tensors = {}  # Ω, summed over finished phases
        self.anchor: Tensors = {}  # θ* at the end of the last finished phase
        self.omega: Tensors = {}  # ω of the running phase
        self.start: Tensors = {}  # θ at the start of the running phase
        self.step_grads: Tensors = {}  # this step's task gradient, captured after backward
        self.step_before: Tensors = {}  # θ before this step

    def before_task(self, task: TaskData, *, resumed: bool = False) -> None:
        self.start = _snapshot(self.ctx.trainable())
        self.omega = {n: torch.zeros_like(t) for n, t in self.start.items()}

    def after_backward(self, step) -> None:
        params = self.ctx.trainable()
        scaler = getattr(self.ctx.accelerator, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else 1.0
        grads = {n: p.grad.detach() / scale if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
        if self.importance and self.cfg.c:
            own = si_penalty_grad(params, self.anchor, self.importance, self.cfg.c)
            grads = {n: g - own[n] for n, g in grads.items()}
        self.step_grads, self.step_before = grads, _snapshot(params)

    def after_step(self, step) -> None:
        after = {n: p.detach() for n, p in self.ctx.trainable().items()}
        self.omega = path_integral_step(self.omega, self.step_grads, self.step_before, after)
        self.step_grads, self.step_before = {}, {}

    def after_task(self, task: TaskData) -> None:
        end = _snapshot(self.ctx.trainable())
        self.importance = consolidate(self.importance, self.omega, self.start, end, self.cfg.xi)
        self.anchor = end
        self.omega, self.start = {}, {}  # spent: the next phase starts its own path integral

    def step_penalty(self, step):
        if not self.importance or self.cfg.c == 0:
            return None
        return si_penalty(self.ctx.trainable(), self.anchor, self.importance, self.cfg.c)

    def state(self):
        # Mid-phase (step checkpoints) the running ω and θ_start are saved too, so a resumed phase
        # ends with the same importance as an uninterrupted one; at a phase's end they are empty.
        return {f"{part}.{n}": t for part in self._SAVED for n, t in getattr(self, part).items()}

    def load_state(self, state):
        params = self.ctx.trainable()
        for part in self._SAVED:
            setattr(self, part, unprefixed(state, f"{part}.", params))


STRATEGY = SI
