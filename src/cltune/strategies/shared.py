"""Helpers several strategies use: the name-to-tensor mapping they pass around, a saved state's tensors
back under their parameters' names, and a gradient list as one vector."""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]


def unprefixed(state: Tensors, prefix: str, params: Tensors) -> Tensors:
    """The tensors of `state` under `prefix`, renamed and moved to their parameters' device and dtype
    (a saved state comes back on the CPU)."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            out[name] = value.to(params[name].device, params[name].dtype)
    return out


def flatten(grads, params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
    """One vector of `grads` in the order of `params`, zeros where a gradient is missing."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params.values())])
