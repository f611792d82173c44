"""`adapters`: one LoRA adapter per task (parameter isolation, the reference pipeline's "progressive networks").

Task 1 trains PEFT's "default" adapter; task k ≥ 2 adds `task{k}` (same LoRA settings, its own
trainable speaker-token rows) and trains only it. Earlier adapters are never touched, so an earlier
task evaluated with its own adapter scores exactly as it did when its phase ended.

Routing (`AdapterRouter`): with the task id (oracle) a task is served by its own adapter; a task
not yet learned by the latest adapter that knows one of its speakers, or, when none does, by the
newest adapter (the model at rest, as a speaker no task has is served by token). With only a speaker token
(agnostic, what `cltune generate` has), a speaker that one learned task has goes to that task's
adapter. A speaker several tasks share (the host) has several candidates; `shared_speakers` says
how they are used:
- `likelihood` (default): scoring treats the candidates as a Bayesian mixture with equal priors,
  p(x) = (1/C) Σ_c p_c(x). Token by token this is  p(x_t | x<t) = Σ_c π_c(x<t) p_c(x_t | x<t)  with
  the posterior π_c(x<t) ∝ p_c(x<t): each token is predicted from the tokens before it only, never
  from itself, so the perplexity is that of a real sequential predictor (at most log C nats per
  utterance worse than the best candidate's, whichever it is). It costs one pass per candidate.
- `latest`: the adapter of the latest learned task with that speaker.
- `validated`: after each phase, every speaker goes to whichever of its candidates alone, or their
  equal-prior mixture, has the lowest NLL on that speaker's utterances in the learned tasks' validation
  splits (`validated_routes`): where the newest adapter has kept an earlier speaker (later ones help
  it) the speaker gets the newest one's transfer whole, without the mixture's up to ln C nats; where
  the candidates are better together, the mixture; one pass per speaker when one adapter is chosen. It
  reads the earlier tasks' validation splits (held out, never trained on) at every phase's end, as
  choosing settings on them would: the earlier files must still be at hand; nothing of them is stored.
With `later_adapters` (and `likelihood`) every speaker's mixture also holds the adapters of the tasks
learned after its last one — where later adapters start from earlier ones (`warm_start`, progressive
columns) they may know the speaker better now (backward transfer), for the same ln C bound.
`cltune generate` samples such a speaker from the same mixture (`generate.generate_mixture`); the
report's samples are per task (oracle). The table is saved in every checkpoint's router.json.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from pydantic import Field

from cltune.config import Strict
from cltune.data.split import TaskData
from cltune.evaluation.evaluate import example_nll, mixture_nll
from cltune.modeling.model import lora_config
from cltune.strategies.base import Context, Costs, Router, Strategy, weights_digest
from cltune.strategies.mixing import trainability_kept


class WarmStartSettings(Strict):
    warm_start: bool = Field(
        False, description="start each new adapter as a copy of the previous task's (forward transfer) instead of fresh"
    )


def later_adapters_field(default: bool):
    """The `later_adapters` setting; `progressive` turns it on by default."""
    return Field(default,
                 description="with likelihood or validated: a speaker's candidates also hold the adapters (columns) "
                             "of every task learned after its last one (backward transfer where they grew from earlier "
                             "ones; the mixture costs ≤ ln C nats/utterance)")


SharedSpeakers = Literal["likelihood", "latest", "validated"]


def shared_speakers_field(default: SharedSpeakers):
    """The `shared_speakers` setting; `progressive` chooses by validation by default."""
    return Field(default,
                 description="agnostic scoring of a speaker with several candidate adapters (a speaker several tasks "
                             "share; with later_adapters every speaker): an equal-prior mixture of them (each token "
                             "predicted from the earlier ones only), the latest task's, or whichever of the "
                             "candidates alone or their mixture scores the speaker's validation utterances best "
                             "after each phase (validated: reads the earlier tasks' validation splits)")


class RoutingSettings(Strict):
    shared_speakers: SharedSpeakers = shared_speakers_field("likelihood")
    later_adapters: bool = later_adapters_field(False)
    # 2: measured on the podcast config (docs/benchmarks/long_streams.md): lower test PPL than all six candidates
    # in 20 of 24 guest × run cells (4 runs), at a cost that stops growing with the stream
    max_candidates: int | None = Field(
        2, ge=1, description="with likelihood or validated: at most this many candidate adapters (columns) for a "
                             "speaker — its latest own and the newest ones — so scoring (likelihood) or choosing "
                             "(validated) costs at most this many passes however long the stream; null: every "
                             "candidate (the cost grows with the tasks)")


class AdaptersSettings(WarmStartSettings, RoutingSettings):
    pass


def adapter_name(task_index: int) -> str:
    """Task 1 keeps "default": its files stay at the checkpoint's top level and phase-1 reuse still works."""
    return "default" if task_index == 0 else f"task{task_index + 1}"


def add_task_adapter(ctx: Context, name: str, token_rows: bool = True) -> None:
    """A fresh LoRA adapter with the run's settings; `token_rows` gives it its own new-token rows.

    PEFT starts new token rows from the base embedding's rows (not from another adapter's), so
    adapters never share those rows either.
    """
    base = ctx.model.get_base_model()
    ctx.model.add_adapter(name, lora_config(base, ctx.lora, ctx.new_token_ids if token_rows else []))


def copy_adapter(model, source: str, target: str) -> None:
    """Copy every weight of adapter `source` (LoRA and token rows) into `target` of the same shape."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            parts = name.split(".")
            if source in parts:
                params[".".join(target if part == source else part for part in parts)].copy_(value)


def fresh_row_mask(ctx: Context, task, adapter: str) -> tuple[torch.nn.Parameter | None, torch.Tensor | None]:
    """`adapter`'s token rows and which of them belong to speakers no earlier task has (True: may train).

    An adapter that carries the whole table (it started from the previous adapter's rows) must leave the
    earlier speakers' rows as they were: the caller zeroes their gradients. Rows trainable only if one is new.
    """
    rows = token_rows(ctx.model, adapter)
    if rows is None:
        return None, None
    earlier = {t for past in ctx.tasks[: task.index] for t in past.tokens.values()}
    fresh = {ctx.tokenizer.convert_tokens_to_ids(t) for t in task.tokens.values() if t not in earlier}
    indices = ctx.model.get_base_model().get_input_embeddings().token_adapter.token_indices[adapter]
    mask = torch.tensor([i in fresh for i in indices], device=rows.device)
    rows.requires_grad_(bool(mask.any()))
    return rows, mask


def token_rows(model, adapter: str) -> torch.nn.Parameter | None:
    """The adapter's trainable new-token rows (shared with a tied LM head), or None when it has none."""
    layer = getattr(model.get_base_model().get_input_embeddings(), "token_adapter", None)
    return (layer.trainable_tokens_delta[adapter]
            if layer is not None and adapter in layer.trainable_tokens_delta else None)


def original_token_rows(model, adapter: str) -> torch.Tensor:
    """The base embedding's values of the new-token rows, as PEFT kept them for `adapter`."""
    return model.get_base_model().get_input_embeddings().token_adapter.trainable_tokens_original[adapter]


@contextmanager
def using_adapter(model, adapter: str | None) -> Iterator[None]:
    """Run with `adapter` active (None: the base model alone), then restore the active adapter and
    exactly which parameters were trainable (PEFT's set_adapter also flips requires_grad)."""
    previous = model.active_adapter
    with trainability_kept(model):
        if adapter is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(adapter)
            try:
                yield
            finally:
                model.set_adapter(previous)


def speaker_routes(task_tokens: Sequence[Iterable[str]]) -> dict[str, list[int]]:
    """Speaker token → indices of the tasks (in stream order) whose speakers include it."""
    routes: dict[str, list[int]] = {}
    for index, tokens in enumerate(task_tokens):
        for token in tokens:
            routes.setdefault(token, []).append(index)
    return routes


class AdapterRouter(Router):
    """Per-task adapters: `tasks[i]` serves task i (None: the base model alone); `routes[token]` lists the
    adapters of the tasks that have a speaker (stream order). `likelihood`: a shared speaker is scored by
    the mixture of its candidates; otherwise by the last one. `validated`: the routes hold what validation
    chose (one adapter or a mixture, once a phase has ended; the flag only names the mode in router.json)."""

    kind = "adapters"
    task_routed = True

    def __init__(self, model, tasks: list[str | None], routes: dict[str, list[str]], likelihood: bool = True,
                 validated: bool = False):
        self.model, self.tasks, self.routes, self.likelihood = model, tasks, routes, likelihood
        self.validated = validated and likelihood

    def serve(self, adapter: str | None):
        """The weights one adapter name stands for (progressive columns override this)."""
        return using_adapter(self.model, adapter)

    def oracle(self, task_index: int):
        return self.serve(self.tasks[task_index])

    def agnostic(self, token: str):
        # A speaker no learned task has: the model as it is (its active adapter).
        return self.serve(self.routes[token][-1]) if token in self.routes else nullcontext()

    def at_rest(self) -> str | None:
        """The name of the weights the model serves as it is (what `agnostic` gives a speaker no task has)."""
        return self.model.active_adapter

    def named_choices(self, token: str):
        if token not in self.routes:
            return [(self.at_rest(), self.agnostic(token))]
        adapters = self.routes[token] if self.likelihood else self.routes[token][-1:]
        return [(adapter, self.serve(adapter)) for adapter in adapters]

    def oracle_name(self, task_index: int) -> str:
        return self.tasks[task_index]

    def weights(self, name: str) -> list[tuple[str, torch.Tensor]]:
        """Every tensor the weights called `name` compute with beside the frozen base: the adapter's."""
        return [(n, p) for n, p in self.model.named_parameters() if name in n.split(".")]

    def weights_fingerprint(self, name: str) -> str | None:
        return None if name is None else weights_digest(self.weights(name))

    def to_json(self) -> dict:
        mode = "validated" if self.validated else "likelihood" if self.likelihood else "latest"
        return {"kind": self.kind, "tasks": self.tasks, "routes": self.routes, "shared_speakers": mode}

    @classmethod
    def from_json(cls, data: dict, model, folder=None) -> AdapterRouter:
        # Checkpoints written before shared speakers had candidates map a token to one adapter: the latest.
        routes = {t: [a] if isinstance(a, str) else list(a) for t, a in dict(data["routes"]).items()}
        mode = data.get("shared_speakers", "latest")
        return cls(model, list(data["tasks"]), routes, mode != "latest", mode == "validated")


@torch.no_grad()
def validated_routes(ctx: Context, router: AdapterRouter, tasks: Sequence[TaskData],
                     cache: dict[tuple[str, int], torch.Tensor] | None = None) -> dict[str, list[str]]:
    """Each speaker's route: of its candidates (`router.routes`) alone and all of them as an equal-prior mixture
    (`mixture_nll`, as agnostic scoring mixes them), the one whose summed NLL on that speaker's utterances in
    `tasks`' validation splits is the lowest (on a tie the earlier candidate, then the mixture); a speaker with
    one candidate or no validation utterance keeps its candidates.

    `cache` holds per-utterance NLLs on a task's validation split by the weights' fingerprint and the task: an
    adapter never changes after its phase, so a later phase scores only the pairs it has not seen — the newest
    adapter on every learned task, the others on the newest task. Scored in the run's arithmetic, not evaluation's
    fp32: a choice the run makes as it trains, like its steps (in bf16 about half the time, and no upcast)."""
    cache = {} if cache is None else cache
    chosen = {}

    def nll(name: str, task: TaskData) -> torch.Tensor:
        fingerprint = router.weights_fingerprint(name)  # None: weights that cannot be told apart, never kept
        if (fingerprint, task.index) in cache:
            return cache[fingerprint, task.index]
        with router.serve(name):
            scored = example_nll(ctx.accelerator, ctx.scorer, ctx.encode(task.val), ctx.tokenizer.pad_token_id,
                                 ctx.eval_batch_size, fp32=False)[0]
        if fingerprint is not None:
            cache[fingerprint, task.index] = scored
        return scored

    for token, names in router.routes.items():
        mine = {task.index: torch.tensor([e.token == token for e in task.val], dtype=torch.bool) for task in tasks}
        heard = [task for task in tasks if mine[task.index].any()]
        if len(names) == 1 or not heard:
            chosen[token] = list(names)
            continue
        # (candidates, utterances): each candidate's summed NLL of each of the speaker's validation utterances
        each = torch.stack([torch.cat([nll(name, task)[mine[task.index]] for task in heard]) for name in names])
        options = [[name] for name in names] + [list(names)]
        losses = [*each.sum(dim=1).tolist(), mixture_nll(each).sum().item()]
        chosen[token] = options[losses.index(min(losses))]
    return chosen


def candidates(own: list[int], learned: Iterable[int], most: int | None = None) -> list[int]:
    """The tasks whose adapters score a speaker, in stream order: its own tasks (`own`), then those in `learned`
    after its last one; with `most`, only its last own task and the newest others, `most` in all."""
    chosen = [*own, *(j for j in learned if j > own[-1])]
    if most is None or len(chosen) <= most:
        return chosen
    return sorted([own[-1], *[j for j in chosen if j != own[-1]][len(chosen) - most :]] if most > 1 else [own[-1]])


def column_costs(model, names: list[str], extra: list[list[torch.Tensor]] | None = None) -> dict:
    """The memory of the per-task weights (metrics.json): the newest adapter's (`names[-1]`: its LoRA factors and
    token rows, plus its `extra` tensors, such as lateral gains), all adapters' together, and their bytes."""
    per, size = [], 0
    for name, more in zip(names, extra or [[] for _ in names]):
        tensors = [p for n, p in model.named_parameters() if name in n.split(".")] + list(more)
        per.append(sum(t.numel() for t in tensors))
        size += sum(t.numel() * t.element_size() for t in tensors)
    return {"columns": len(names), "column_parameters": per[-1], "all_columns_parameters": sum(per),
            "all_columns_bytes": size}


class Adapters(Strategy):
    name = "adapters"
    summary = "one LoRA adapter per task; earlier adapters frozen; routed by task id (oracle) or speaker token"
    sections = {"adapters": AdaptersSettings}
    phase1_neutral = True

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.cfg: AdaptersSettings = next(iter(settings.values()))
        self.chosen: dict[str, list[str]] = {}  # validated: speaker token → the route chosen after the last phase
        self._validation_nll: dict[tuple[str, int], torch.Tensor] = {}  # validated_routes' cache

    @property
    def learned(self) -> int:
        """How many task adapters exist (derived from the model, so a reloaded checkpoint agrees)."""
        return sum(adapter_name(i) in self.ctx.model.peft_config for i in range(len(self.ctx.tasks)))

    def before_task(self, task, *, resumed=False):
        name = adapter_name(task.index)
        if name not in self.ctx.model.peft_config:
            add_task_adapter(self.ctx, name)
            if self.cfg.warm_start:
                copy_adapter(self.ctx.model, adapter_name(task.index - 1), name)
        self.ctx.model.set_adapter(name)  # PEFT: this adapter trains, every other adapter is frozen

    def starts_as(self, task):
        # warm_start: the new adapter is a copy of the last one, the same function to the last bit
        return adapter_name(task.index - 1) if self.cfg.warm_start and task.index > 0 else None

    def after_task(self, task):
        return {**column_costs(self.ctx.model, [adapter_name(i) for i in range(self.learned)]),
                **self.validate_routes()}

    def validate_routes(self) -> Costs:
        """validated: choose every speaker's route on the learned tasks' validation splits; returns the choice's
        seconds, how many speakers went to one later adapter than their own latest, and how many to a mixture."""
        if self.cfg.shared_speakers != "validated":
            return {}
        start = time.perf_counter()
        self.chosen = {}
        mixture = self.router()  # every speaker's candidates
        self.chosen = validated_routes(self.ctx, mixture, self.ctx.tasks[: self.learned], self._validation_nll)
        own = {t: adapter_name(indices[-1]) for t, indices in self.routes().items()}
        later = sum(len(route) == 1 and route != [own[t]] for t, route in self.chosen.items())
        return {"route_choice_wall_s": round(time.perf_counter() - start, 2), "speakers_on_later_columns": later,
                "speakers_on_mixtures": sum(len(route) > 1 for route in self.chosen.values())}

    def state(self):
        """The chosen routes as a (speaker token, adapter) table of 0/1, tokens sorted, adapters in task order."""
        if not self.chosen:
            return {}
        tokens = sorted({t for task in self.ctx.tasks for t in task.tokens.values()})
        names = [adapter_name(i) for i in range(len(self.ctx.tasks))]
        return {"validated_routes": torch.tensor([[name in self.chosen.get(t, ()) for name in names]
                                                  for t in tokens], dtype=torch.uint8)}

    def load_state(self, state):
        if "validated_routes" in state:
            tokens = sorted({t for task in self.ctx.tasks for t in task.tokens.values()})
            names = [adapter_name(i) for i in range(len(self.ctx.tasks))]
            self.chosen = {t: [n for n, on in zip(names, row) if on]
                           for t, row in zip(tokens, state["validated_routes"].tolist()) if any(row)}

    def routes(self) -> dict[str, list[int]]:
        return speaker_routes([t.tokens.values() for t in self.ctx.tasks[: self.learned]])

    def adapter_for_task(self, task_index: int) -> str | None:
        """The task's own adapter; else the latest one that knows one of its speakers; else the newest adapter,
        the model at rest, which also serves such a task's speakers when routed by token (one function, one
        scoring, and forward transfer read as for a single model); None only before any adapter exists."""
        if task_index < self.learned:
            return adapter_name(task_index)
        routes = self.routes()
        known = [routes[t][-1] for t in self.ctx.tasks[task_index].tokens.values() if t in routes]
        if known:
            return adapter_name(max(known))
        return adapter_name(self.learned - 1) if self.learned else None

    def router(self) -> AdapterRouter:
        """Task → adapter and speaker → candidates (validated: the chosen one, once a phase has chosen)."""
        tasks = [self.adapter_for_task(i) for i in range(len(self.ctx.tasks))]
        likelihood = self.cfg.shared_speakers != "latest"
        later = range(self.learned) if likelihood and self.cfg.later_adapters else range(0)
        routes = {t: self.chosen[t] if t in self.chosen else
                  [adapter_name(i) for i in candidates(indices, later, self.cfg.max_candidates)]
                  for t, indices in self.routes().items()}
        return AdapterRouter(self.ctx.model, tasks, routes, likelihood, self.cfg.shared_speakers == "validated")


ROUTERS = (AdapterRouter,)  # `cltune generate` rebuilds a saved AdapterRouter from its router.json
STRATEGY = Adapters
