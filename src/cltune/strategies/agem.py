"""`agem`: Averaged Gradient Episodic Memory (Chaudhry et al. 2019) on the trainable parameters.

A seeded sample of each finished dataset's training utterances is kept (the same sample `replay`
would keep at that ratio). From phase 2 on, after every backward the reference gradient g_ref of
the mean token NLL on one memory batch is computed; when the step's gradient g conflicts with it
(g·g_ref < 0), g is replaced by  g − (g·g_ref / g_ref·g_ref) · g_ref,  the nearest gradient that
does not raise the memory loss to first order. Both are flattened over all trainable parameters.

The projection sees the gradient before clipping (the loop clips after `after_backward`). Under
fp16 loss scaling g is still scaled; the projection is linear in g and ignores g_ref's scale, so
the result is the projected gradient under the same scale.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict

import torch
from pydantic import Field

from cltune.config import Strict
from cltune.data.split import TaskData, require_no_test
from cltune.modeling.batching import collate
from cltune.modeling.scoring import target_nll
from cltune.storage.hashing import derived_seed
from cltune.strategies.base import Costs, StepInfo, Strategy
from cltune.strategies.replay import ReplayBuffer, ReplaySettings
from cltune.strategies.shared import flatten

log = logging.getLogger(__name__)
MEMORY_MICRO_BATCH = 8  # memory utterances per forward pass of the reference gradient


class AGEMSettings(Strict):
    memory_ratio: float = Field(
        0.1, ge=0, le=1, description="share of each earlier dataset's training utterances kept in memory")
    memory_batch: int = Field(16, ge=1, description="memory utterances behind each step's reference gradient")


def agem_project(grad: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`grad` itself when g·g_ref ≥ 0, else g − (g·g_ref / g_ref·g_ref) · g_ref."""
    dot = torch.dot(grad, reference)
    if dot >= 0:
        return grad
    return grad - (dot / torch.dot(reference, reference)) * reference  # dot < 0, so g_ref ≠ 0


class AGEM(Strategy):
    name = "agem"
    summary = "A-GEM: project each step's gradient so it does not raise the loss on a 10% memory of earlier datasets"
    sections = {"agem": AGEMSettings}
    phase1_neutral = True

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.cfg: AGEMSettings = settings["agem"]
        self.memory = ReplayBuffer(ReplaySettings(ratio=self.cfg.memory_ratio), ctx.seed)
        self.encoded: list[list[int]] = []
        self.encoded_tasks: list[int] = []  # the dataset of each encoded memory utterance
        self.phase = 0
        self.steps = self.projected = 0  # of the running phase: reference gradients, projections (logged)

    def before_task(self, task: TaskData, *, resumed: bool = False) -> None:
        self.phase = task.index
        self.steps = self.projected = 0

    def after_task(self, task: TaskData) -> Costs:
        if self.steps:
            log.info("agem, %s: projected %d of %d steps", task.name, self.projected, self.steps)
        self.memory.add(task)
        self._encode_memory()
        return {"stored_utterances": len(self.encoded), "reference_passes": self.steps,
                "projected_steps": self.projected}

    def _encode_memory(self) -> None:
        examples = require_no_test(self.memory.examples(), "the A-GEM memory")
        self.encoded = self.ctx.encode(examples)
        self.encoded_tasks = [e.task for e in examples]

    def reference_gradient(self, params: dict[str, torch.nn.Parameter], step: StepInfo,
                           task: int | None = None) -> torch.Tensor:
        """Flattened gradient of the mean token NLL of one memory batch (of dataset `task`'s memory only, when
        given: GEM's per-dataset constraints), dropout off.

        torch.autograd.grad returns the gradient without touching `.grad`, so the step's own
        gradient needs no saving and restoring around it.
        """
        acc, scorer = self.ctx.accelerator, self.ctx.scorer
        # Seeded by (run seed, phase, step): every process draws the same batch, and so does a resumed run.
        rng = random.Random(derived_seed(self.ctx.seed, "agem", step.phase, step.step - 1,
                                         *([] if task is None else [task])))
        pool = range(len(self.encoded)) if task is None else [i for i, t in enumerate(self.encoded_tasks) if t == task]
        picked = rng.sample(pool, min(self.cfg.memory_batch, len(pool)))
        # Length-sorted forward passes of MEMORY_MICRO_BATCH: one batch of random lengths would be
        # mostly padding. The summed gradients are the gradient of the whole batch's mean.
        order = sorted(picked, key=lambda i: len(self.encoded[i]))
        batches = [collate(self.encoded, order[k : k + MEMORY_MICRO_BATCH], self.ctx.tokenizer.pad_token_id)
                   for k in range(0, len(order), MEMORY_MICRO_BATCH)]
        targets = sum(b.n_targets for b in batches)
        was_training = scorer.training
        scorer.eval()
        total = torch.zeros(sum(p.numel() for p in params.values()), device=acc.device)
        try:
            for batch in batches:
                inputs = {k: v.to(acc.device) for k, v in batch.model_inputs().items()}
                with acc.autocast():
                    loss = target_nll(scorer(**inputs), inputs["labels"]).sum() / targets
                total += flatten(torch.autograd.grad(loss, list(params.values()), allow_unused=True), params)
        finally:
            scorer.train(was_training)
        # The same batch on every process; averaging removes numeric differences so replicas stay equal.
        return acc.reduce(total, "mean")

    def after_backward(self, step: StepInfo) -> None:
        if not self.encoded:
            return
        params = self.ctx.trainable()
        grad = flatten([p.grad for p in params.values()], params)
        projected = agem_project(grad, self.reference_gradient(params, step))
        self.steps += 1
        if projected is grad:
            return
        self.projected += 1
        self._assign(params, projected)

    @staticmethod
    def _assign(params: dict[str, torch.nn.Parameter], projected: torch.Tensor) -> None:
        """Write the flat `projected` gradient back into the parameters' `.grad`."""
        offset = 0
        for p in params.values():
            new = projected[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = new.clone()
            else:
                p.grad.copy_(new)  # in place: under DDP .grad may be a view into the reducer's bucket

    def state(self):
        """The memory as (task, source line) pairs of its utterances, and the phase's step counters."""
        examples = self.memory.examples()
        return {"memory.task": torch.tensor([e.task for e in examples], dtype=torch.long),
                "memory.line": torch.tensor([e.line for e in examples], dtype=torch.long),
                "counters": torch.tensor([self.phase, self.steps, self.projected], dtype=torch.long)}

    def load_state(self, state):
        if not state:  # nothing was saved: a fresh strategy
            return
        by_key = {(t.index, e.line): e for t in self.ctx.tasks for e in t.train}
        samples = defaultdict(list)
        for task, line in zip(state["memory.task"].tolist(), state["memory.line"].tolist()):
            samples[task].append(by_key[(task, line)])
        self.memory.samples = dict(samples)
        self._encode_memory()
        self.phase, self.steps, self.projected = state["counters"].tolist()


STRATEGY = AGEM
