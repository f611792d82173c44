"""`progressive`: progressive networks (Rusu et al. 2016, arXiv 1606.04671) in LoRA form — a new column
(adapter) per task, with learned lateral inputs from the frozen earlier columns.

Column k serves task k. In every LoRA layer l its update is its own adapter's plus the earlier adapters'
outputs through learned lateral gains (one per output channel, per earlier adapter):

    ΔW^(k) x = s_k B_k A_k x + Σ_{j<k} u_{k,j,l} ⊙ (s_j B_j A_j x)

computed as one low-rank product of the k+1 adapters stacked (`AdapterMix`): a training step costs about what one
adapter's does however many columns there are (docs/benchmarks/long_streams.md).

Column k starts as column k−1 exactly, the other gains copied from column k−1 and the token rows from
its rows, in one of two ways (`new_column`): `fresh`, B_k = 0 (LoRA's initialisation) and u_{k,k−1} = 1;
or `copy`, adapter k a copy of adapter k−1 and u_{k,k−1} = 0 (a non-zero B_k, so both factors get
gradients from the first step, as in `adapters.warm_start`). Either way a phase begins where the last
one ended while every earlier column, adapter and gain stays frozen: a task served by its own column
scores exactly as when its phase ended.

Routing is that of `adapters` (the same routing settings): by task id (oracle) or by speaker token
(agnostic). The defaults, `copy` and `later_adapters` (a speaker's candidates are its own column and the
later ones, since they grew from its own), are the measured best of the four combinations: new-task
perplexity at naive's and most of naive's backward transfer. `shared_speakers: validated` (default) sends
each speaker, after every phase, to the candidate that scores its validation utterances best: where the
newest column has kept an earlier guest (plain sequential fine-tuning would not forget it) the guest gets
that column's transfer, otherwise its own column, exactly as its phase left it, or the two mixed where
that scores lower. Lateral gains are saved with every checkpoint (`module.laterals.`); `cltune generate`
routes through them (router kind `progressive`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from cltune.errors import UserError
from cltune.modeling.checkpoint import load_strategy_state
from cltune.strategies.adapters import (
    AdapterRouter,
    Adapters,
    RoutingSettings,
    SharedSpeakers,
    adapter_name,
    add_task_adapter,
    column_costs,
    copy_adapter,
    later_adapters_field,
    shared_speakers_field,
    token_rows,
    using_adapter,
)
from cltune.strategies.base import Router, module_weights
from cltune.strategies.mixing import AdapterMix, lora_layers, trainability_kept

LATERALS = "laterals"


class ProgressiveSettings(RoutingSettings):
    # The defaults are the measured best of the four combinations (docs/benchmarks/strategies_added.md).
    new_column: Literal["fresh", "copy"] = Field(
        "copy",
        description="copy: the column's adapter starts as a copy of the previous adapter, whose gain starts at 0; "
                    "fresh: it starts at zero (LoRA's B = 0) with gain 1 on the previous adapter")
    later_adapters: bool = later_adapters_field(True)
    lateral_gains: bool = Field(
        True, description="train the column's lateral gains with its adapter; false: they keep their start values "
                          "(copy: 0, so a column is its own adapter, continued from the previous one's)")
    # validated: the "notice on validation data"; on the podcast config (3 seeds) its means were below the
    # likelihood mixture's on five of six guests, within the runs' spread (docs/benchmarks/long_streams.md)
    shared_speakers: SharedSpeakers = shared_speakers_field("validated")


class Laterals(torch.nn.Module):
    """Lateral gains: for column c and LoRA layer l, a (c, out_features_l) tensor, one row per earlier adapter."""

    def __init__(self, widths: list[int], tasks: int):
        super().__init__()
        self.columns = torch.nn.ModuleList(
            torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(c, w)) for w in widths) if c
            else torch.nn.ParameterList()
            for c in range(tasks))

    @torch.no_grad()
    def start(self, column: int, previous_gain: float = 1.0) -> None:
        """Column `column` starts from column − 1's gains, and `previous_gain` on column − 1's adapter (1 when
        the new adapter starts at zero, 0 when it starts as a copy of that adapter)."""
        for layer, gains in enumerate(self.columns[column]):
            if column > 1:
                gains[: column - 1] = self.columns[column - 1][layer]
            gains[column - 1] = previous_gain

    def train_only(self, column: int | None) -> None:
        for c, gains in enumerate(self.columns):
            gains.requires_grad_(c == column)


def laterals_for(model, tasks: int) -> Laterals:
    widths = [layer.out_features for layer in lora_layers(model)]
    return Laterals(widths, tasks).to(next(model.parameters()).device)


def column_of(adapter: str) -> int:
    """The column an adapter name stands for (`default` is task 1's, `taskK` task K's)."""
    return 0 if adapter == "default" else int(adapter.removeprefix("task")) - 1


class Columns:
    """Which column the model serves. Switching removes the current column's mix and installs another's;
    which parameters are trainable is left as it was."""

    def __init__(self, model, laterals: Laterals):
        self.model, self.laterals = model, laterals
        self.current: int | None = None
        self._mix: AdapterMix | None = None

    def use(self, column: int | None) -> None:
        if column == self.current:
            return
        with trainability_kept(self.model):
            if self._mix is not None:
                self._mix.remove()
                self._mix = None
            if column == 0:
                self.model.set_adapter(adapter_name(0))
            elif column is not None:
                # one low-rank product a layer: the earlier adapters through the column's gains, its own at weight 1
                gains = self.laterals.columns[column]
                self._mix = AdapterMix(self.model, [adapter_name(i) for i in range(column + 1)],
                                       lambda layer, x: [*gains[layer], None])
        self.current = column

    @contextmanager
    def serving(self, adapter: str | None) -> Iterator[None]:
        """`adapter`'s column serves inside (None: the base model alone); the column before is back after."""
        if adapter is None:
            with using_adapter(self.model, None):
                yield
            return
        previous = self.current
        self.use(column_of(adapter))
        try:
            yield
        finally:
            self.use(previous)


class ProgressiveRouter(AdapterRouter):
    """`adapters`' routing, each adapter name standing for its column (the adapter and its lateral gains)."""

    kind = "progressive"

    def __init__(self, model, tasks, routes, likelihood: bool, columns: Columns, validated: bool = False):
        super().__init__(model, tasks, routes, likelihood, validated)
        self.columns = columns

    def serve(self, adapter: str | None):
        return self.columns.serving(adapter)

    def weights(self, name: str) -> list[tuple[str, torch.Tensor]]:
        """Column `name`'s tensors: its adapter, the earlier ones and its lateral gains."""
        k = column_of(name)
        adapters = {adapter_name(i) for i in range(k + 1)}
        own = [(n, p) for n, p in self.model.named_parameters() if adapters & set(n.split("."))]
        return own + [(f"{LATERALS}.{k}.{layer}", g) for layer, g in enumerate(self.columns.laterals.columns[k])]

    def at_rest(self) -> str | None:
        current = self.columns.current
        if current is None:  # no column installed: PEFT's active adapter alone, which is column 1 when it is task 1's
            first = adapter_name(0)
            return first if self.model.active_adapter == first else None
        return adapter_name(current)

    def to_json(self) -> dict:
        return {**super().to_json(), "at_rest": self.columns.current}

    @classmethod
    def from_json(cls, data: dict, model, folder=None) -> ProgressiveRouter:
        """The saved lateral gains (the checkpoint's strategy state, `module.laterals.`) bound to a loaded
        model, with the column the run left at rest installed."""
        plain = AdapterRouter.from_json(data, model)
        weights = module_weights(load_strategy_state(folder), LATERALS)
        laterals = laterals_for(model, 1 + max((int(k.split(".")[1]) for k in weights), default=0))
        try:
            laterals.load_state_dict(weights)
        except RuntimeError:
            raise UserError(f"{Path(folder)}: lateral gains missing or not fitting this model; restore the checkpoint "
                            "folder") from None
        columns = Columns(model, laterals)
        columns.use(data.get("at_rest", 0))
        return cls(model, plain.tasks, plain.routes, plain.likelihood, columns, plain.validated)


class Progressive(Adapters):
    name = "progressive"
    summary = ("a new LoRA column per task with learned lateral gains from the frozen earlier columns; "
               "routed like adapters")
    sections = {"progressive": ProgressiveSettings}

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.laterals = laterals_for(ctx.model, len(ctx.tasks))
        self.laterals.train_only(None)
        self.columns = Columns(ctx.model, self.laterals)

    def before_task(self, task, *, resumed=False):
        model, name, k = self.ctx.model, adapter_name(task.index), task.index
        if k > 0 and name not in model.peft_config:
            add_task_adapter(self.ctx, name)  # B = 0: the column's own update starts at zero
            copied = self.cfg.new_column == "copy"
            if copied:  # LoRA weights and token rows; the copied adapter's gain starts at 0 instead
                copy_adapter(model, adapter_name(k - 1), name)
            else:
                rows, previous = token_rows(model, name), token_rows(model, adapter_name(k - 1))
                if rows is not None:
                    with torch.no_grad():
                        rows.copy_(previous)
            self.laterals.start(k, 0.0 if copied else 1.0)
        self.columns.use(k)
        if k > 0:
            for n, p in model.named_parameters():  # this column's adapter (and its token rows) train, nothing earlier
                p.requires_grad_(name in n.split("."))
            self.laterals.train_only(k if self.cfg.lateral_gains else None)

    def starts_as(self, task):
        # Either way of starting a column (`new_column`) computes the previous column's function (to rounding:
        # copy adds a zero-gain block to the column's product).
        return adapter_name(task.index - 1) if task.index > 0 else None

    def adapter_for_task(self, task_index: int) -> str | None:
        # A column continues the one before it (a copy, with gains onto every earlier one): a task not learned yet is
        # served by the newest — the model at rest, as naive's one model serves it, and the column its phase starts as.
        if task_index < self.learned or not self.learned:
            return super().adapter_for_task(task_index)
        return adapter_name(self.learned - 1)

    def after_task(self, task):
        self.laterals.train_only(None)
        columns = range(task.index + 1)
        return {**column_costs(self.ctx.model, [adapter_name(k) for k in columns],
                               [list(self.laterals.columns[k]) for k in columns]),
                **self.validate_routes()}

    def router(self) -> Router:
        plain = super().router()
        return ProgressiveRouter(self.ctx.model, plain.tasks, plain.routes, plain.likelihood, self.columns,
                                 plain.validated)

    def modules(self):
        return {LATERALS: self.laterals}


ROUTERS = (ProgressiveRouter,)  # `cltune generate` rebuilds a saved ProgressiveRouter from its router.json
STRATEGY = Progressive
