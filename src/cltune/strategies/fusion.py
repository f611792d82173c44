"""`fusion`: one LoRA adapter per task, combined by a small learned gate that reads each layer's input —
no task id, no speaker routing: the gate decides, token by token, from what the model has read so far.

In every LoRA layer l, with the adapters of the tasks learned so far,

    h = W x + Σ_i g_i(x) · s_i B_i A_i x,     g(x) = softmax(G_l x̂ + b_l),   x̂ = x / rms(x)

(AdapterFusion's idea, Pfeiffer et al. 2021, arXiv 2005.00247, with LoRA updates in place of bottleneck
adapters and a linear gate in place of its attention). Because the model is causal, the gate at a
position sees only that token and the ones before it: each token is still predicted from its context.

Phase 1 trains task 1's adapter alone, exactly as `naive` does. Phase k ≥ 2:
- the new adapter starts as a copy of the previous one and the gate's new row as a copy of the previous
  adapter's row, both biases lowered by ln 2: the two copies share exactly the weight the previous adapter
  had, so the model starts the phase computing what it computed at the end of the last one (tested);
- the new adapter, its speakers' token rows and the gate train, on the new task plus a replay buffer
  (the `replay` settings); earlier adapters and earlier speakers' rows never change;
- besides the language-model loss, a routing loss (`route_loss`) teaches the gate which dataset each
  training utterance came from: the cross-entropy of its weights at every target position against that
  dataset's adapter, averaged over layers. Training data knows its dataset; evaluation never needs it.
  (Trained by the language-model loss alone, on 10% replay, the gate of a short phase barely moves: the
  first measurement forgot as much as naive.) The gate reads x without sending gradients back into it.
The new adapter carries the whole token table (PEFT serves one adapter's rows at a time).
The gate is saved with every checkpoint; `cltune generate` reinstalls it (router kind `fusion`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from cltune.config import Strict
from cltune.errors import UserError
from cltune.modeling.batching import IGNORE
from cltune.modeling.checkpoint import load_strategy_state
from cltune.strategies.adapters import adapter_name, add_task_adapter, copy_adapter, fresh_row_mask
from cltune.strategies.base import Router, module_weights
from cltune.strategies.mixing import AdapterMix, lora_layers
from cltune.strategies.replay import Replay

GATE = "gate"


class FusionSettings(Strict):
    gate_input: bool = Field(True, description="condition the gate on the layer's input (false: one learned weight "
                                               "per layer and adapter, the same for every token)")
    route_loss: float = Field(1.0, ge=0, description="weight of the gate's routing loss: the cross-entropy of each "
                                                     "token's gate weights against the dataset its utterance came from "
                                                     "(0: the gate learns from the language-model loss alone)")


class FusionGate(torch.nn.Module):
    """One linear gate per LoRA layer: input width → one logit per task of the stream."""

    def __init__(self, widths: list[int], tasks: int, token_dependent: bool = True):
        super().__init__()
        self.token_dependent = token_dependent
        self.proj = torch.nn.ModuleList(torch.nn.Linear(w, tasks) for w in widths)
        for layer in self.proj:
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)

    def weights(self, index: int, x: torch.Tensor, count: int) -> torch.Tensor:
        """The first `count` adapters' weights for layer `index`'s input x: (..., count), summing to 1."""
        layer = self.proj[index]
        with torch.autocast(x.device.type, enabled=False):  # a softmax of tiny logits: keep it in fp32
            if not self.token_dependent:
                return layer.bias[:count].float().softmax(-1).expand(*x.shape[:-1], count)
            x = x.detach().float()  # the gate reads the input; its losses do not reach back into it
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return F.linear(x, layer.weight[:count].float(), layer.bias[:count].float()).softmax(-1)

    @torch.no_grad()
    def split(self, source: int, target: int) -> None:
        """Give row `target` a copy of row `source` and halve both shares (biases − ln 2): with identical
        adapters behind the two rows, every layer's output is unchanged."""
        for layer in self.proj:
            layer.weight[target] = layer.weight[source]
            layer.bias[source] -= math.log(2)
            layer.bias[target] = layer.bias[source]


def install(model, gate: FusionGate, adapters: list[str], seen: dict | None = None) -> AdapterMix | None:
    """The gate's mix of `adapters` on `model` (None for one adapter: it serves alone, weight 1); `seen`, when
    given, receives each layer's gate weights of the last forward pass (for the routing loss)."""
    if len(adapters) < 2:
        return None
    count = len(adapters)

    def scales(index, x):
        w = gate.weights(index, x, count)
        if seen is not None:
            seen[index] = w
        return [w[..., i : i + 1] for i in range(count)]

    return AdapterMix(model, adapters, scales)


def routing_loss(weights: list[torch.Tensor], tasks: torch.Tensor) -> torch.Tensor:
    """Σ over target positions of the mean over layers of −log g_task: each layer's gate weights (targets, adapters)
    scored against the dataset (adapter index) each target's utterance came from."""
    picked = torch.stack([w.gather(-1, tasks[:, None]).squeeze(-1) for w in weights])  # (layers, targets)
    return -picked.clamp_min(1e-12).log().mean(dim=0).sum()


def gate_for(model, tasks: int, token_dependent: bool = True) -> FusionGate:
    widths = [layer.in_features for layer in lora_layers(model)]
    device = next(model.parameters()).device
    return FusionGate(widths, tasks, token_dependent).to(device)


class FusionRouter(Router):
    """The gate serves every task and speaker: it is installed on the model, so nothing is switched."""

    kind = "fusion"

    def __init__(self, adapters: list[str], token_dependent: bool = True, mix: AdapterMix | None = None):
        self.adapters, self.token_dependent, self.mix = adapters, token_dependent, mix

    def oracle(self, task_index: int):
        return nullcontext()

    def agnostic(self, token: str):
        return nullcontext()

    def to_json(self) -> dict:
        return {"kind": self.kind, "adapters": self.adapters, "gate_input": self.token_dependent}

    @classmethod
    def from_json(cls, data: dict, model, folder=None) -> FusionRouter:
        """Reinstall the saved gate (the checkpoint's strategy state, `module.gate.`) on a loaded model."""
        adapters, token_dependent = list(data["adapters"]), bool(data.get("gate_input", True))
        if len(adapters) < 2:
            return cls(adapters, token_dependent)
        weights = module_weights(load_strategy_state(folder), GATE)
        if not weights:
            raise UserError(f"{Path(folder)}: a fusion checkpoint without its gate; restore the checkpoint folder")
        gate = gate_for(model, weights["proj.0.bias"].shape[0], token_dependent)
        try:
            gate.load_state_dict(weights)
        except RuntimeError:
            raise UserError(f"{Path(folder)}: the fusion gate does not fit this model; "
                            "restore the checkpoint folder") from None
        return cls(adapters, token_dependent, install(model, gate, adapters))


class Fusion(Replay):
    name = "fusion"
    summary = ("per-task LoRA adapters mixed token by token by a learned gate on each layer's input; "
               "replay trains the gate")
    sections = {"replay": Replay.sections["replay"], "fusion": FusionSettings}

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.cfg: FusionSettings = settings["fusion"]
        self.gate = gate_for(ctx.model, len(ctx.tasks), self.cfg.gate_input)
        self.gate.requires_grad_(False)  # trains from phase 2 on (phase 1 has one adapter)
        self.mix: AdapterMix | None = None
        self.rows: torch.nn.Parameter | None = None
        self.row_mask: torch.Tensor | None = None
        self.seen: dict[int, torch.Tensor] = {}  # layer → the gate weights of the last forward pass
        self.origin = torch.zeros(0, dtype=torch.long)  # the phase's training utterances' datasets, in train_data order

    def adapters(self, count: int) -> list[str]:
        return [adapter_name(i) for i in range(count)]

    def before_task(self, task, *, resumed=False):
        model, name = self.ctx.model, adapter_name(task.index)
        if task.index == 0:
            return
        if name not in model.peft_config:
            add_task_adapter(self.ctx, name)
            copy_adapter(model, adapter_name(task.index - 1), name)  # LoRA weights and the whole token table
            self.gate.split(task.index - 1, task.index)
        if self.mix is not None:
            self.mix.remove()
        self.mix = install(model, self.gate, self.adapters(task.index + 1), self.seen)
        for n, p in model.named_parameters():  # the new adapter trains; earlier ones are the frozen past
            p.requires_grad_(name in n.split("."))
        self.rows, self.row_mask = fresh_row_mask(self.ctx, task, name)
        self.gate.requires_grad_(True)
        self.origin = torch.tensor([e.task for e in self.train_data(task)], dtype=torch.long)

    def whole_rows(self) -> bool:
        return self.mix is not None and bool(self.cfg.route_loss)  # the routing loss reads every position's gate

    def batch_loss(self, batch, outputs, step):
        """The routing loss: at each target position the gate should pick the adapter of the utterance's dataset
        (the training data knows which; evaluation and generation never need it)."""
        if self.mix is None or not self.cfg.route_loss or not self.seen:
            return None
        device = outputs.logits.device
        owner = batch.target_example.to(self.origin.device)
        tasks = self.origin[owner].to(device)
        mask = (batch.labels[:, 1:] != IGNORE).to(device)
        weights = [self.seen[layer][:, :-1][mask] for layer in sorted(self.seen)]
        return self.cfg.route_loss * routing_loss(weights, tasks) / len(tasks)

    def after_backward(self, step):
        if self.rows is not None and self.rows.grad is not None:
            self.rows.grad[~self.row_mask] = 0  # earlier speakers' rows belong to the frozen past

    def after_task(self, task):
        costs = super().after_task(task)  # the replay buffer takes its sample of this task
        self.rows = self.row_mask = None
        return costs

    def router(self) -> Router:
        learned = sum(adapter_name(i) in self.ctx.model.peft_config for i in range(len(self.ctx.tasks)))
        return FusionRouter(self.adapters(max(learned, 1)), self.cfg.gate_input)

    def modules(self):
        return {GATE: self.gate}


ROUTERS = (FusionRouter,)  # `cltune generate` rebuilds a saved FusionRouter from its router.json
STRATEGY = Fusion
