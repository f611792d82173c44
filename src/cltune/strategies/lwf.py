"""`lwf`: Learning without Forgetting — distil the previous phase's model on the new task's inputs.

From phase 2 on, every micro-batch also runs the frozen model of the end of the previous phase
(the teacher) and adds  α · T² · mean over target tokens of KL(p_teacher,T ‖ p_student,T),  where
p_T = softmax(logits / T). The T² keeps the gradient scale independent of T (Hinton et al. 2015).

The teacher is the same base model with the previous phase's trainable tensors (LoRA factors and
new-token rows) swapped in for one forward pass: the base weights are frozen, so those tensors are
all that differ, and no second model is held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from pydantic import Field

from cltune.config import Strict
from cltune.data.split import TaskData
from cltune.strategies.base import Strategy
from cltune.strategies.shared import Tensors, unprefixed


class LwFSettings(Strict):
    temperature: float = Field(2.0, gt=0, description="softening temperature T of teacher and student distributions")
    weight: float = Field(1.0, ge=0, description="distillation weight α; the added loss is α·T²·KL")


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) of each row (token), in fp32."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)


def lwf_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
             weight: float) -> torch.Tensor:
    """α · T² · the mean over tokens of the distillation KL."""
    return weight * temperature**2 * distillation_kl(student_logits, teacher_logits, temperature).mean()


@contextmanager
def swapped_in(params: dict[str, torch.nn.Parameter], values: Tensors) -> Iterator[None]:
    """Temporarily give `params` the data of `values`, keeping the Parameter objects themselves.

    `.data` is swapped rather than copied in place: the student's forward has already saved these
    parameters for its backward, and an in-place copy would bump their version counters and make
    that backward fail. The optimizer's references stay valid because the objects never change
    (torch.func.functional_call replaces PEFT's trainable-token Parameter with a new object).
    """
    originals = {name: p.data for name, p in params.items()}
    try:
        for name, p in params.items():
            p.data = values[name]
        yield
    finally:
        for name, p in params.items():
            p.data = originals[name]


class LwF(Strategy):
    name = "lwf"
    summary = "Learning without Forgetting: distil the previous phase's token distributions on the new data (T=2, α=1)"
    sections = {"lwf": LwFSettings}
    phase1_neutral = True

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.cfg: LwFSettings = settings["lwf"]
        self.teacher: Tensors = {}

    def after_task(self, task: TaskData) -> None:
        # Taken after early stopping's restore, so the teacher is the model the phase kept.
        self.teacher = {n: p.detach().clone() for n, p in self.ctx.trainable().items()}

    def teacher_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The previous phase's logits at the target positions of `inputs`: no grad, dropout off."""
        scorer = self.ctx.scorer
        was_training = scorer.training
        scorer.eval()
        try:
            with torch.no_grad(), swapped_in(self.ctx.trainable(), self.teacher):
                return scorer(**inputs)
        finally:
            scorer.train(was_training)

    def batch_loss(self, batch, outputs, step):
        if not self.teacher or self.cfg.weight == 0:
            return None
        inputs = {k: v.to(self.ctx.accelerator.device) for k, v in batch.model_inputs().items()}
        return lwf_loss(outputs.logits, self.teacher_logits(inputs), self.cfg.temperature, self.cfg.weight)

    def state(self):
        return {f"teacher.{n}": t for n, t in self.teacher.items()}

    def load_state(self, state):
        # Saved tensors come back on the CPU; the swap needs them where the parameters live.
        self.teacher = unprefixed(state, "teacher.", self.ctx.trainable())


STRATEGY = LwF
