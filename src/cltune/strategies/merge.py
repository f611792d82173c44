"""`merge`: adapter fusion — per-task adapters (as in `adapters`) merged into one `merged` adapter.

After each task every task adapter learned so far is combined with PEFT's `add_weighted_adapter`
into `merged`, and every task is evaluated with that single adapter (no task identity needed). Each
task's adapter starts as a copy of the previous task's (`warm_start`, true by default), so the merge
averages points along one training path; `warm_start: false` trains each from LoRA's start.

Weights are relative shares w̃ (default equal), normalized over the adapters being merged, so the
merged adapter after task 1 is task 1's own. The default, `cat`, is exact: the factors are stacked
(A rows scaled by w̃_i·s_i, B columns as they are; rank r per task), so ΔW = Σ w̃_i ΔW_i. `svd`
computes the same sum and truncates it to rank r (exact when the sum's rank fits). `linear`
combines the A and B factors separately — A = Σ √(w̃_i s_i) A_i, B = Σ √(w̃_i s_i) B_i — so the
product has cross terms B_i A_j (PEFT's "rough approximation"; large for independently initialised
adapters); `ties`/`dare_ties` prune each factor to `density` and average the entries that agree in
sign, so there the shares are multiplied by the adapter count (equal shares → weight 1 each, TIES's
λ = 1) rather than shrunk twice. Density defaults to 0.5, not TIES's 0.2: pruning hits A and B
separately, so it compounds.

PEFT does not merge trainable token rows: the new adapter gets the base embedding's rows. They are
set here to  original + Σ w̃_i (rows_i − original),  the share-weighted average of the task
adapters' rows, for every combination type (the rows are few and dense; pruning them is pointless).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from cltune.errors import UserError
from cltune.modeling.model import add_weighted_adapter
from cltune.strategies.adapters import (
    Adapters,
    WarmStartSettings,
    adapter_name,
    original_token_rows,
    token_rows,
    using_adapter,
)
from cltune.strategies.base import Router

MERGED = "merged"


class MergeSettings(WarmStartSettings):
    # true: on the demo config (one seed, docs/benchmarks/stability.md) fresh adapters merged at equal shares served
    # guest B worse after its phase than before it (93.3 → 104.8 val PPL; final test 114.4 / 66.9), each continued
    # from the last 92.9 → 76.6 (84.1 / 52.3, naive's run beside it 85.4 / 50.5)
    warm_start: bool = Field(
        True, description="start each task's adapter as a copy of the previous task's (so the merge averages points "
                          "along one path) instead of fresh")
    combination_type: Literal["cat", "svd", "linear", "ties", "dare_ties"] = Field(
        "cat", description="PEFT add_weighted_adapter method; cat is exact (ΔW = Σ w̃_i ΔW_i), linear adds cross terms")
    weights: list[float] | None = Field(None, description="relative weight per task, one per task (default: equal)")
    density: float = Field(0.5, gt=0, le=1, description="share of each factor's entries kept by ties/dare_ties")

    @field_validator("weights")
    @classmethod
    def _positive(cls, v):
        if v is not None and any(w <= 0 for w in v):
            raise ValueError("merge weights must be positive (they are relative shares)")
        return v


def merge_shares(weights: list[float] | None, count: int) -> list[float]:
    """Shares of the first `count` task adapters: their weights normalized to sum to 1."""
    chosen = [1.0] * count if weights is None else list(weights[:count])
    total = sum(chosen)
    return [w / total for w in chosen]


def peft_weights(shares: list[float], combination_type: str) -> list[float]:
    """The `weights` passed to PEFT: the shares for the weighted sums; shares × count for the sign-elected means."""
    if combination_type in ("cat", "svd", "linear") or len(shares) == 1:  # PEFT falls back to linear for one adapter
        return list(shares)
    return [s * len(shares) for s in shares]


def merge_token_rows(original: torch.Tensor, rows: list[torch.Tensor], shares: list[float]) -> torch.Tensor:
    """original + Σ share_i (rows_i − original): the deltas combined like the LoRA weights."""
    merged = original.clone()
    for share, r in zip(shares, rows):
        merged = merged + share * (r - original)
    return merged


class Merge(Adapters):
    name = "merge"
    summary = "per-task LoRA adapters merged (linear/TIES/DARE) into one adapter after every task"
    sections = {"merge": MergeSettings}

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.cfg: MergeSettings
        if self.cfg.weights is not None and len(self.cfg.weights) != len(ctx.tasks):
            raise UserError(f"merge.weights: {len(self.cfg.weights)} weights for {len(ctx.tasks)} tasks; "
                            "give one per task")

    def after_task(self, task):
        model = self.ctx.model
        names = [adapter_name(i) for i in range(task.index + 1)]
        shares = merge_shares(self.cfg.weights, len(names))
        if MERGED in model.peft_config:  # add_weighted_adapter silently keeps an existing adapter of that name
            model.delete_adapter(MERGED)
        add_weighted_adapter(model, names, peft_weights(shares, self.cfg.combination_type), MERGED,
                             combination_type=self.cfg.combination_type, density=self.cfg.density)
        rows = token_rows(model, MERGED)
        if rows is not None:
            with torch.no_grad():
                rows.copy_(merge_token_rows(original_token_rows(model, MERGED), [token_rows(model, n) for n in names],
                                            shares))
        # At rest the model is the merged adapter: later evaluation, samples and the checkpoint use it.
        model.set_adapter(MERGED, inference_mode=True)

    def router(self) -> Router:
        """The merged adapter serves every task and speaker (before the first merge: task 1's adapter)."""
        merged = MERGED in self.ctx.model.peft_config
        return FixedAdapterRouter(self.ctx.model, MERGED if merged else adapter_name(0))


class FixedAdapterRouter(Router):
    """One adapter serves every task and speaker (a merged adapter): no task id needed."""

    kind = "fixed"

    def __init__(self, model, adapter: str):
        self.model, self.adapter = model, adapter

    def oracle(self, task_index: int):
        return using_adapter(self.model, self.adapter)

    def agnostic(self, token: str):
        return using_adapter(self.model, self.adapter)

    def to_json(self) -> dict:
        return {"kind": self.kind, "adapter": self.adapter}

    @classmethod
    def from_json(cls, data: dict, model, folder=None) -> FixedAdapterRouter:
        return cls(model, data["adapter"])


ROUTERS = (FixedAdapterRouter,)  # `cltune generate` rebuilds a saved FixedAdapterRouter from its router.json
STRATEGY = Merge
