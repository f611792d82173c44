"""Per-token negative log-likelihood of a causal LM, the one computation behind training loss,
perplexity, attribution, Fisher and distillation.

Two speed-ups over calling the model, with identical results (tested):
- the LM head runs only at target positions (pads and each utterance's last token need no logits);
- with PEFT trainable-token rows, the frozen embedding matrix is used as is and only the new rows
  are patched in, instead of materializing (and back-propagating into) a full copy of the
  vocabulary × width matrix at every step in the embedding and again in the tied LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cltune.batching import IGNORE


def _new_rows(module: nn.Module):
    """(frozen weight, new-row ids, trainable rows) of a PEFT trainable-tokens wrapper whose single
    active adapter is unmerged; None when the plain module call is the right path."""
    layer = getattr(module, "token_adapter", None)
    if layer is None or layer.merged or layer.disable_adapters or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.trainable_tokens_delta or layer._get_embed_scale() is not None:
        return None
    weight = layer.base_layer.weight
    ids = torch.as_tensor(layer.token_indices[name], device=weight.device)
    return weight, ids, layer.trainable_tokens_delta[name]


def _embed(module: nn.Module, input_ids: torch.Tensor) -> torch.Tensor | None:
    rows = _new_rows(module)
    if rows is None or not isinstance(module.token_adapter.base_layer, nn.Embedding):
        return None
    weight, ids, delta = rows
    slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
    slot[ids] = torch.arange(len(ids), device=weight.device)
    slots = slot[input_ids]
    base = F.embedding(input_ids, weight)
    return torch.where((slots >= 0).unsqueeze(-1), delta[slots.clamp(min=0)].to(base.dtype), base)


def _head(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    rows = _new_rows(module)
    if rows is None or not isinstance(module.token_adapter.base_layer, nn.Linear):
        return module(hidden)
    weight, ids, delta = rows
    return F.linear(hidden, weight).index_copy(-1, ids, F.linear(hidden, delta.to(hidden.dtype)))


class TokenScorer(nn.Module):
    """Wraps a (PEFT) causal LM; forward returns the logits at target positions.

    It is a module so that Accelerate/DDP can prepare it: its forward is the model's forward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _base(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits at target positions, shape (targets, vocab), row-major over the batch; with
        `return_hidden`, also the last hidden states there, shape (targets, width)."""
        base = self._base()
        decoder = base.get_decoder()
        embeds = _embed(base.get_input_embeddings(), input_ids)
        inputs = {"input_ids": input_ids} if embeds is None else {"inputs_embeds": embeds}
        hidden = decoder(**inputs, position_ids=position_ids, use_cache=False).last_hidden_state
        mask = labels[:, 1:] != IGNORE
        at_targets = hidden[:, :-1][mask]
        logits = _head(base.get_output_embeddings(), at_targets)
        return (logits, at_targets) if return_hidden else logits


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL of each target token (fp32), in the same order as the scorer's logits."""
    targets = labels[:, 1:][labels[:, 1:] != IGNORE]
    return F.cross_entropy(logits.float(), targets, reduction="none")


def per_example_sums(values: torch.Tensor, target_example: torch.Tensor, n: int) -> torch.Tensor:
    """Sum per-token values into one number per example (indices from the batch)."""
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    return out.index_add_(0, target_example.to(values.device), values)
