"""`gem`: Gradient Episodic Memory (Lopez-Paz & Ranzato 2017) on the trainable parameters.

Like `agem`, a seeded sample of each finished dataset's training utterances is kept. Unlike A-GEM, which
constrains the step against one averaged memory gradient, GEM keeps one constraint per earlier dataset:
after every backward the reference gradient g_k of the mean token NLL on a memory batch of each earlier
dataset k is computed, and when the step's gradient g conflicts with any of them (g·g_k < 0) it is replaced
by the nearest gradient that conflicts with none,

    g̃ = argmin ½‖g̃ − g‖²  subject to  G g̃ ≥ 0   (G: the g_k as rows),

through its dual over T−1 variables: v* = argmin_{v ≥ 0} ½ vᵀ(G Gᵀ)v + (G g)ᵀ v, and g̃ = g + Gᵀ v*. The dual
is a non-negative least-squares problem (‖Gᵀv + g‖² up to a constant), solved exactly by an active-set
method on the (T−1)×(T−1) Gram matrix. `margin` is the paper's γ, a lower bound on the dual variables
(v ≥ γ instead of v ≥ 0), which pushes g̃ further into the feasible cone; 0 by default, as in the paper's code.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from cltune.config import Strict
from cltune.strategies.agem import AGEM
from cltune.strategies.base import StepInfo
from cltune.strategies.shared import flatten

log = logging.getLogger(__name__)


class GEMSettings(Strict):
    memory_ratio: float = Field(
        0.1, ge=0, le=1, description="share of each earlier dataset's training utterances kept in memory")
    memory_batch: int = Field(
        16, ge=1, description="memory utterances of each earlier dataset behind its reference gradient")
    margin: float = Field(
        0.0, ge=0, description="GEM's γ: dual variables at least γ, pushing the step further from the constraints")


def nonnegative_qp(gram: torch.Tensor, linear: torch.Tensor, tol: float = 1e-12) -> torch.Tensor:
    """argmin_{v ≥ 0} ½ vᵀ·gram·v + linearᵀ·v for a symmetric positive semi-definite `gram` (Lawson–Hanson
    active set, in float64). Exact up to round-off: the result satisfies the KKT conditions (tested)."""
    gram, linear = gram.double(), linear.double()
    k = len(linear)
    gram = gram + torch.eye(k, dtype=gram.dtype) * 1e-10 * max(gram.diagonal().max().item(), 1e-30)  # rank-deficient G
    v = torch.zeros(k, dtype=torch.float64)
    passive = torch.zeros(k, dtype=torch.bool)
    for _ in range(3 * k + 10):
        descent = -(gram @ v + linear)  # the negative gradient; at the optimum ≤ 0 on the active set
        candidates = descent.masked_fill(passive, -float("inf"))
        if candidates.max() <= tol * max(1.0, linear.abs().max().item()):
            break
        passive[candidates.argmax()] = True
        while True:
            index = passive.nonzero().squeeze(1)
            s = torch.zeros(k, dtype=torch.float64)
            s[index] = torch.linalg.solve(gram[index][:, index], -linear[index])
            if (s[index] > 0).all():
                v = s
                break
            shrinking = index[s[index] <= 0]
            step = (v[shrinking] / (v[shrinking] - s[shrinking])).min()
            v = v + step * (s - v)
            passive &= v > tol
            v[~passive] = 0.0
    return v


def gem_project(grad: torch.Tensor, references: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """`grad` itself when it conflicts with no row of `references` (each g·g_k ≥ 0); else g + Gᵀv* with v* the
    dual solution under v ≥ margin (v = u + margin, u ≥ 0)."""
    dots = references @ grad
    if (dots >= 0).all():
        return grad
    refs = references.double()
    gram = refs @ refs.T
    floor = torch.full((len(dots),), margin, dtype=torch.float64)
    v = nonnegative_qp(gram, dots.double() + gram @ floor) + floor
    return (grad.double() + refs.T @ v).to(grad.dtype)


class GEM(AGEM):
    name = "gem"
    summary = ("GEM: project each step's gradient so it raises the loss of no earlier dataset's 10% memory "
               "(one constraint each)")
    sections = {"gem": GEMSettings}

    def __init__(self, ctx, settings):
        super().__init__(ctx, {"agem": settings["gem"]})
        self.cfg: GEMSettings = settings["gem"]

    def after_backward(self, step: StepInfo) -> None:
        if not self.encoded:
            return
        params = self.ctx.trainable()
        grad = flatten([p.grad for p in params.values()], params)
        references = torch.stack([self.reference_gradient(params, step, task) for task in sorted(self.memory.samples)])
        projected = gem_project(grad, references, self.cfg.margin)
        self.steps += 1
        if projected is grad:
            return
        self.projected += 1
        self._assign(params, projected)


STRATEGY = GEM
