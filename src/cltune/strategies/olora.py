"""`olora`: O-LoRA (Wang et al. 2023, arXiv 2310.14152) — each task learns in a LoRA subspace
orthogonal to the earlier tasks' ones.

Task k ≥ 2 trains a new adapter `task{k}` while every earlier task adapter stays frozen and in the
forward pass (their updates summed), with the extra loss

    λ1 · Σ_layers Σ_jk |(A_past A_newᵀ)_jk|  +  λ2 · ‖new LoRA parameters‖²

where A_past stacks the earlier tasks' A matrices (PEFT stores A as rank × in_features, so the
paper's A_pastᵀ A_new is A_past A_newᵀ here).

Folding: after each later task the task adapters are summed exactly into one adapter, `olora`
(PEFT `add_weighted_adapter`, `cat`: A rows and B columns stacked, rank r per task), which is the
model at rest — evaluation, samples and the checkpoint's active adapter. Why not fold into the
base weights: checkpoints hold adapters only, so they would lose every earlier task. Why keep the
task adapters as well: the loss needs each task's raw A; a resumed run recreates the adapters
from the checkpoint, where a re-ranked "default" would not fit the fresh model's; and PEFT's
checkpoint loader activates a single adapter, which `olora` is.

Token rows: PEFT lets one adapter's rows be active at a time, so each task adapter carries the
whole table, starting from the previous task's rows; a task trains only the rows of speaker tokens
that no earlier task has (the other rows' gradients are zeroed), so earlier speakers stay put.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import Field

from cltune.config import Strict
from cltune.modeling.model import add_weighted_adapter
from cltune.strategies.adapters import adapter_name, add_task_adapter, fresh_row_mask, token_rows
from cltune.strategies.base import Strategy
from cltune.strategies.mixing import lora_layers

SUMMED = "olora"


class OLoRASettings(Strict):
    lambda1: float = Field(0.5, ge=0, description="weight λ1 of the orthogonality loss (paper: 0.5)")
    lambda2: float = Field(
        0.0, ge=0, description="weight λ2 of the squared L2 norm of the new LoRA parameters (paper: 0)")


def _total(terms: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(terms).sum() if terms else torch.zeros(())  # on the terms' device


def orthogonality_loss(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ over LoRA layers of Σ |A_past A_newᵀ|, each A as rank × in_features."""
    return _total([(past @ new.T).abs().sum() for past, new in pairs])


def l2_loss(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Σ ‖p‖² over the given parameters."""
    return _total([p.pow(2).sum() for p in params])


def fold(model, adapters: list[str]) -> None:
    """Make `SUMMED` the exact sum of `adapters` (ΔW = Σ ΔW_i) and the active, frozen model.

    `cat` stacks (scaling · A) rows and B columns under scaling 1. PEFT does not merge token rows:
    the sum gets the last adapter's, which hold every speaker learned so far.
    """
    # One adapter active first: PEFT's delete re-activates the active list, which the token rows refuse.
    model.set_adapter(adapters[-1])
    if SUMMED in model.peft_config:  # add_weighted_adapter silently keeps an existing adapter of that name
        model.delete_adapter(SUMMED)
    add_weighted_adapter(model, adapters, [1.0] * len(adapters), SUMMED, combination_type="cat")
    rows = token_rows(model, SUMMED)
    if rows is not None:
        with torch.no_grad():
            rows.copy_(token_rows(model, adapters[-1]))
    model.set_adapter(SUMMED, inference_mode=True)


class OLoRA(Strategy):
    name = "olora"
    summary = "O-LoRA: a new LoRA per task kept orthogonal to earlier tasks' LoRA subspaces, all summed into one"
    sections = {"olora": OLoRASettings}

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.cfg: OLoRASettings = settings["olora"]
        self.pairs: list[tuple[torch.Tensor, torch.nn.Parameter]] = []  # (frozen past A, new A) per layer
        self.new_params: list[torch.nn.Parameter] = []
        self.rows: torch.nn.Parameter | None = None  # the token rows in use while a later task trains
        self.row_mask: torch.Tensor | None = None  # True: a row of `rows` this task may train

    def before_task(self, task, *, resumed=False):
        model, name = self.ctx.model, adapter_name(task.index)
        if task.index > 0:
            earlier = [adapter_name(i) for i in range(task.index)]
            add_task_adapter(self.ctx, name)
            previous_rows = token_rows(model, earlier[-1])
            if previous_rows is not None:
                with torch.no_grad():
                    token_rows(model, name).copy_(previous_rows)
            model.set_adapter(name)  # bookkeeping, and the token rows in use: this adapter's
            for layer in lora_layers(model):
                layer.set_adapter(earlier + [name])  # the LoRA updates of all tasks so far are summed
            for n, p in model.named_parameters():
                p.requires_grad_(name in n.split("."))
            self.pairs = [(torch.cat([layer.lora_A[a].weight for a in earlier]).detach(), layer.lora_A[name].weight)
                          for layer in lora_layers(model)]
            self.rows, self.row_mask = fresh_row_mask(self.ctx, task, name)
        self.new_params = [p for layer in lora_layers(model)
                           for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)]

    def step_penalty(self, step):
        terms = []
        if self.pairs and self.cfg.lambda1:
            terms.append(self.cfg.lambda1 * orthogonality_loss(self.pairs))
        if self.new_params and self.cfg.lambda2:
            terms.append(self.cfg.lambda2 * l2_loss(self.new_params))
        return sum(terms) if terms else None

    def after_backward(self, step):
        if self.rows is not None and self.rows.grad is not None:
            self.rows.grad[~self.row_mask] = 0  # earlier speakers' rows belong to the frozen past

    def after_task(self, task):
        if task.index > 0:
            fold(self.ctx.model, [adapter_name(i) for i in range(task.index + 1)])
        else:
            self.ctx.model.set_adapter(adapter_name(0), inference_mode=True)
        self.pairs, self.new_params, self.rows, self.row_mask = [], [], None, None


STRATEGY = OLoRA
