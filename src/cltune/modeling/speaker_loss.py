"""A speaker-discrimination loss (`train.speaker_loss`): teach the speaker token to matter.

Speaker attribution asks whether an utterance's text is more likely after its own speaker's token
than after any other speaker's of its dataset (same context). The LM loss alone rewards that only
weakly: most of a turn is predictable without knowing who says it. This term trains the very
comparison: with p(c | text, context) ∝ exp(−NLL_c), the text's summed target NLL after speaker c's
token (equal prior), it adds the mean over a step's utterances of

    −log p(own | text, context) = NLL_own + log Σ_c exp(−NLL_c)

Each other candidate costs one more forward and backward of the utterance (the text and its
context are the same; only the speaker token changes). Utterances of a one-speaker dataset have
no comparison to make and add nothing.
"""

from __future__ import annotations

import torch

from cltune.data.split import Example, TaskData
from cltune.modeling.batching import Tokens, collate, context_of
from cltune.modeling.scoring import per_example_sums, target_nll


def speaker_cross_entropy(nll: torch.Tensor) -> torch.Tensor:
    """−log p(own | text) per utterance from `nll` (utterances, candidates) of summed target NLLs, the own
    speaker's in column 0 and +inf where an utterance has fewer candidates."""
    return nll[:, 0] + torch.logsumexp(-nll, dim=1)


class SpeakerContrast:
    """The loss term for one phase's encoded training examples (each example's candidates: its dataset's speakers)."""

    def __init__(self, examples: list[Example], encoded: list[Tokens], tasks: list[TaskData], tokenizer, pad_id: int):
        ids = {t: tokenizer.convert_tokens_to_ids(t) for task in tasks for t in task.tokens.values()}
        by_task = {task.index: list(task.tokens.values()) for task in tasks}
        self.others = [[ids[t] for t in by_task[e.task] if t != e.token] for e in examples]
        self.encoded, self.pad_id = encoded, pad_id

    def batch_sum(self, scorer, batch, own_nll: torch.Tensor) -> torch.Tensor:
        """Σ over the batch's utterances of −log p(own speaker | text, context); `own_nll` is the batch's per-target
        NLL from the main forward (its graph reaches the own-speaker scores)."""
        n = len(self.encoded)
        own = per_example_sums(own_nll, batch.target_example, n)[batch.examples]
        width = 1 + max(len(self.others[i]) for i in batch.examples)
        if width == 1:
            return own.new_zeros(())
        variants, slots = [], []
        for row, i in enumerate(batch.examples):
            seq, at = self.encoded[i], context_of(self.encoded[i])
            for column, speaker in enumerate(self.others[i], start=1):
                variants.append(Tokens([*seq[:at], speaker, *seq[at + 1 :]], at))
                slots.append((row, column))
        alternative = collate(variants, list(range(len(variants))), self.pad_id)
        device = own_nll.device
        inputs = {k: v.to(device) for k, v in alternative.model_inputs().items()}
        sums = per_example_sums(target_nll(scorer(**inputs), inputs["labels"]), alternative.target_example.to(device),
                                len(variants))
        table = torch.full((len(batch.examples), width), float("inf"), device=device, dtype=sums.dtype)
        table[:, 0] = own
        rows, columns = (torch.tensor(part, device=device) for part in zip(*slots))
        table = table.index_put((rows, columns), sums)
        return speaker_cross_entropy(table).sum()
