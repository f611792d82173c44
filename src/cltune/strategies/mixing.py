"""Several LoRA adapters at once, each one's update weighted inside every layer, computed as one low-rank
product: what `fusion` (a learned gate per token) and `progressive` (learned lateral gains per channel) are
built on.

PEFT sums the active adapters of a LoRA layer, ΔW x = Σ_i s_i B_i A_i x, one adapter after another. An
`AdapterMix` weights adapter i's update by w_i and computes the whole sum as one LoRA of the adapters' total rank:

    Σ_i w_i ⊙ (s_i B_i A_i x) = B' ((A x) ⊙ t),   A = [A_0; …; A_{n−1}],   B' = [c_0 ⊙ s_0 B_0, …] side by side,

where a per-token weight (shape (..., 1)) scales its adapter's block of A x (t) and a per-channel one (shape
(out,)) or a scalar scales its B (c). `scales(layer, x)` returns the weights for that layer's input x, None
for 1. One forward hook a layer adds the sum while PEFT runs none of its adapters there (each layer's active
list is emptied): one dropout draw (the primary adapter's), two products and one sum a layer, the cost of a
single LoRA of the total rank, where PEFT's own path costs every adapter's dropout, products and sums plus a
hook each to weight them. The same function and gradients as PEFT running each adapter with its weight (to
float rounding; tested) in eval mode; in training the adapters share one dropout draw on x (PEFT draws one
per adapter). A and B' are built at every forward from the live weights, so loading weights after installing
needs nothing more.

The last adapter of the list is the primary one: the model's active adapter, whose trainable token
rows (speaker tokens) the embedding uses (PEFT serves one adapter's rows at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer

# scales(layer index, layer input) -> one weight per adapter of the mix: per token (..., 1), per output channel
# (out,) or one number (a 0-d tensor); None: weight 1
Scales = Callable[[int, torch.Tensor], Sequence[torch.Tensor | None]]


def lora_layers(model) -> list[LoraLayer]:
    """The model's LoRA layers in module order (the order the mix's `layer` index counts)."""
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


class AdapterMix:
    """`adapters` all added in every LoRA layer of `model`, adapter i's update weighted by `scales(l, x)[i]`.

    Installing keeps which parameters are trainable (PEFT's per-layer set_adapter flips them) and
    `remove()` restores the model's previous active adapter and trainability.
    """

    def __init__(self, model, adapters: Sequence[str], scales: Scales):
        self.model, self.adapters, self.scales = model, list(adapters), scales
        self.previous = model.active_adapter
        self._hooks = []
        with trainability_kept(model):
            model.set_adapter(self.adapters[-1])
            for index, layer in enumerate(lora_layers(model)):
                layer.set_adapter([])  # the hook adds every adapter's update
                self._hooks.append(layer.register_forward_hook(self._add(index, layer)))

    def _add(self, index: int, layer: LoraLayer):
        names, primary = self.adapters, self.adapters[-1]

        def hook(module, args, output):
            if layer.disable_adapters:  # the base model alone (`using_adapter(model, None)`)
                return output
            if layer.active_adapters:  # PEFT would run them as well: the sum would count them twice
                raise RuntimeError(f"adapters {layer.active_adapters} were set active under an AdapterMix of "
                                   f"{names}; remove the mix before switching adapters")
            x = args[0]
            a = [layer.lora_A[name].weight for name in names]
            b = [layer.lora_B[name].weight * layer.scaling[name] for name in names]
            per_token = {}  # adapter position -> its weight per token, which scales that adapter's block of A x
            for i, weight in enumerate(self.scales(index, x)):
                if weight is not None and weight.dim() and weight.shape[-1] == 1:
                    per_token[i] = weight
                elif weight is not None:  # per output channel (or one number): its B
                    b[i] = b[i] * (weight[:, None] if weight.dim() else weight)
            h = layer.lora_dropout[primary](x).to(a[-1].dtype) @ torch.cat(a).T
            if per_token:
                h = h * torch.cat([per_token[i].to(h.dtype).expand(*h.shape[:-1], len(a[i])) if i in per_token
                                   else h.new_ones(*h.shape[:-1], len(a[i])) for i in range(len(a))], dim=-1)
            return output + (h @ torch.cat(b, dim=1).T).to(output.dtype)
        return hook

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
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
