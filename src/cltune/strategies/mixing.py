"""Several LoRA adapters at once, each one's update scaled inside every layer: what `fusion` (a learned
gate per token) is built on. (`progressive`'s lateral gains, one per channel, add the earlier adapters as one
stacked product instead: `cltune.strategies.progressive.LateralSum`, tested equal to a mix of them.)

PEFT sums the active adapters of a LoRA layer, ΔW x = Σ_i s_i B_i A_i x. An `AdapterMix` activates a
list of adapters in every LoRA layer and multiplies adapter i's output B_i A_i x by a weight that
`scales(layer, x)` returns for that layer's input x: a tensor broadcast against the output (one value
per token, per channel, or both), or None for 1. PEFT's adapters stay the only weights that change the
model; the mix adds forward hooks (one on each LoRA layer to compute the weights, one on each adapter's
B to apply them) and removes them exactly.

The last adapter of the list is the primary one: the model's active adapter, whose trainable token
rows (speaker tokens) the embedding uses (PEFT serves one adapter's rows at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer

# scales(layer index, layer input) -> one weight per adapter of the mix (None: weight 1, the output untouched)
Scales = Callable[[int, torch.Tensor], Sequence[torch.Tensor | None]]


def lora_layers(model) -> list[LoraLayer]:
    """The model's LoRA layers in module order (the order the mix's `layer` index counts)."""
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


class AdapterMix:
    """`adapters` all active in every LoRA layer of `model`, adapter i's output weighted by `scales(l, x)[i]`.

    Installing keeps which parameters are trainable (PEFT's per-layer set_adapter flips them) and
    `remove()` restores the model's previous active adapter and trainability.
    """

    def __init__(self, model, adapters: Sequence[str], scales: Scales):
        self.model, self.adapters, self.scales = model, list(adapters), scales
        self.previous = model.active_adapter
        self._weights: dict[int, Sequence[torch.Tensor | None]] = {}
        self._hooks = []
        with trainability_kept(model):
            model.set_adapter(self.adapters[-1])
            for index, layer in enumerate(lora_layers(model)):
                layer.set_adapter(self.adapters)
                self._hooks.append(layer.register_forward_pre_hook(self._compute(index)))
                for position, name in enumerate(self.adapters):
                    self._hooks.append(layer.lora_B[name].register_forward_hook(self._apply(index, position)))

    def _compute(self, index: int):
        def hook(module, args):
            self._weights[index] = self.scales(index, args[0])
        return hook

    def _apply(self, index: int, position: int):
        def hook(module, args, output):
            weight = self._weights[index][position]
            return output if weight is None else output * weight.to(output.dtype)
        return hook

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._weights = [], {}
        with trainability_kept(self.model):
            self.model.set_adapter(self.previous)


@contextmanager
def trainability_kept(model) -> Iterator[None]:
    """Inside, switch adapters freely; after, exactly the parameters that were trainable are (PEFT's
    set_adapter, model-wide or per layer, marks the adapters it activates trainable)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    try:
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
