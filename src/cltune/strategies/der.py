"""`der`: Dark Experience Replay++ (Buzzega et al. 2020) for a causal LM.

Like `replay`, a seeded sample of each finished dataset's training utterances is mixed into later phases
and trained on with its own tokens (DER++'s label term, weight 1 like any utterance). In addition, when a
dataset's phase ends the model's logits at each kept utterance's target positions are stored — the top
`top_k` of the vocabulary per position, values and token ids — and whenever a kept utterance is in a
micro-batch the loss adds  α · mean over its target positions of the mean squared difference between the
current logits and the stored ones at those ids. The stored logits carry the "dark knowledge" of the model
as it was when the dataset was learned, not the labels alone.

The sum over the batch is divided by the micro-batch's target tokens, so α weighs one position's logit
error against one token's NLL whatever the share of replayed utterances.
"""

from __future__ import annotations

import torch
from pydantic import Field

from cltune.config import Strict
from cltune.data.split import Example, TaskData, require_no_test
from cltune.modeling.batching import collate
from cltune.modeling.scoring import fp32_arithmetic
from cltune.strategies.base import Costs, Strategy
from cltune.strategies.replay import ReplayBuffer, ReplaySettings

STORE_MICRO_BATCH = 16  # kept utterances per forward pass when their logits are stored


class DERSettings(Strict):
    ratio: float = Field(0.1, ge=0, le=1, description="share of each earlier dataset's training utterances kept")
    alpha: float = Field(0.5, ge=0, description="weight α of the logit-matching term")
    top_k: int = Field(32, ge=1, description="logits stored per target position (the largest ones)")


def logit_match(student: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per target position: the mean over its k stored ids of (student logit − stored logit)², in fp32."""
    return (student.float().gather(1, ids.long()) - values.float()).pow(2).mean(dim=1)


class DER(Strategy):
    name = "der"
    summary = "DER++: replay 10% of earlier data and match the logits (top 32) stored when each dataset was learned"
    sections = {"der": DERSettings}
    phase1_neutral = True

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.cfg: DERSettings = settings["der"]
        self.buffer = ReplayBuffer(ReplaySettings(ratio=self.cfg.ratio), ctx.seed)
        self.stored: dict[Example, tuple[torch.Tensor, torch.Tensor]] = {}  # utterance → (values, ids) per target
        self.phase_examples: list[Example] = []

    def train_data(self, task: TaskData) -> list[Example]:
        self.phase_examples = task.train + self.buffer.examples()
        return self.phase_examples

    def after_task(self, task: TaskData) -> Costs:
        kept = self.buffer.add(task)
        self._store(kept)
        return {"stored_utterances": len(self.buffer.examples()),
                "stored_logits": sum(v.numel() for v, _ in self.stored.values())}

    @torch.no_grad()
    def _store(self, examples: list[Example]) -> None:
        """The current model's top-k logits at every target position of `examples` (dropout off, fp32)."""
        examples = require_no_test(examples, "the DER buffer")
        encoded = self.ctx.encode(examples)
        scorer, device = self.ctx.scorer, self.ctx.accelerator.device
        was_training = scorer.training
        scorer.eval()
        try:
            with fp32_arithmetic(scorer):
                for start in range(0, len(encoded), STORE_MICRO_BATCH):
                    indices = list(range(start, min(start + STORE_MICRO_BATCH, len(encoded))))
                    batch = collate(encoded, indices, self.ctx.tokenizer.pad_token_id)
                    logits = scorer(**{k: v.to(device) for k, v in batch.model_inputs().items()}).float()
                    values, ids = logits.topk(min(self.cfg.top_k, logits.shape[-1]), dim=-1)
                    owner = batch.target_example.to(device)
                    for i in indices:
                        mine = owner == i
                        self.stored[examples[i]] = (values[mine].clone(), ids[mine].to(torch.int32).clone())
        finally:
            scorer.train(was_training)

    def batch_loss(self, batch, outputs, step):
        if not self.stored or self.cfg.alpha == 0:
            return None
        owner = batch.target_example.to(outputs.logits.device)
        kept = [i for i in torch.unique_consecutive(owner).tolist() if self.phase_examples[i] in self.stored]
        if not kept:
            return None
        # Targets of one utterance are contiguous and in order in the scorer's row-major logits.
        mask = torch.isin(owner, torch.tensor(kept, device=owner.device))
        values = torch.cat([self.stored[self.phase_examples[i]][0] for i in kept]).to(outputs.logits.device)
        ids = torch.cat([self.stored[self.phase_examples[i]][1] for i in kept]).to(outputs.logits.device)
        return self.cfg.alpha * logit_match(outputs.logits[mask], values, ids).sum() / len(owner)

    def state(self):
        """The buffer as positions in each task's training split, and the stored logits in buffer order."""
        out = self.buffer.to_state(self.ctx.tasks)
        examples = self.buffer.examples()
        if examples:
            out["values"] = torch.cat([self.stored[e][0] for e in examples]).cpu()
            out["ids"] = torch.cat([self.stored[e][1] for e in examples]).cpu()
            out["counts"] = torch.tensor([len(self.stored[e][0]) for e in examples], dtype=torch.long)
        return out

    def load_state(self, state):
        self.buffer.load(state, self.ctx.tasks)
        self.stored = {}
        if "counts" in state:
            counts = state["counts"].tolist()
            values, ids = state["values"].split(counts), state["ids"].split(counts)
            self.stored = {e: (v, i) for e, v, i in zip(self.buffer.examples(), values, ids)}


STRATEGY = DER
