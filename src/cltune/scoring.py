"""Per-token negative log-likelihood of a causal LM, the one computation behind training loss,
perplexity, attribution, Fisher and distillation.

The LM head runs only at target positions: with a 49k-token vocabulary it is a large share of
the compute, and pads and the last token of each utterance need no logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cltune.batching import IGNORE


class TokenScorer(nn.Module):
    """Wraps a (PEFT) causal LM; forward returns hidden states and targets at target positions.

    It is a module so that Accelerate/DDP can prepare it: its forward is the model's forward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _base(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits at target positions, shape (targets, vocab), row-major over the batch."""
        base = self._base()
        hidden = base.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        mask = labels[:, 1:] != IGNORE
        return base.get_output_embeddings()(hidden[:, :-1][mask])


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL of each target token (fp32), in the same order as the scorer's logits."""
    targets = labels[:, 1:][labels[:, 1:] != IGNORE]
    return F.cross_entropy(logits.float(), targets, reduction="none")


def per_example_sums(values: torch.Tensor, target_example: torch.Tensor, n: int) -> torch.Tensor:
    """Sum per-token values into one number per example (indices from the batch)."""
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    return out.index_add_(0, target_example.to(values.device), values)
