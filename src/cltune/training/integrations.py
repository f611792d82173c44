"""cltune's strategies inside your own Hugging Face `Trainer` or TRL `SFTTrainer` script.

Keep the script; learn the next dataset while protecting the earlier ones:

    from cltune.training.integrations import (AGEMProjection, ContinualMixin, EWCPenalty, LwFDistillation,
                                              replay_mix)

    class ContinualSFTTrainer(ContinualMixin, SFTTrainer): ...
    trainer = ContinualSFTTrainer(model=model, args=args, train_dataset=replay_mix(new, old, ratio=0.1),
                                  strategies=[EWCPenalty.from_checkpoint("checkpoints/run/phase1", model),
                                              LwFDistillation(model)])

The model is a PEFT model whose trainable parameters (LoRA weights, trainable token rows) are what the
strategies protect. The math is cltune's own (`ewc_penalty`, `lwf_loss`, `agem_project`), on the same
token positions: targets are the tokens whose labels are not −100, predicted from the position before,
as transformers' causal-LM loss counts them. On one batch the loss and gradients equal those of
cltune's training loop (tested): EWC's penalty and LwF's distillation are added to the batch's loss;
A-GEM projects the gradient after backward and before the Trainer clips it (as cltune's loop does).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer

from cltune.errors import UserError
from cltune.modeling.scoring import target_nll
from cltune.strategies.agem import AGEM as _AGEMStrategy
from cltune.strategies.agem import agem_project
from cltune.strategies.ewc import ewc_penalty, fisher_diagonal
from cltune.strategies.lwf import lwf_loss, swapped_in
from cltune.strategies.shared import Tensors, flatten

MODEL_INPUTS = {"input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids"}
_ANCHOR = re.compile(r"^((?:\d+\.)*)(\d+)\.(theta|fisher)\.(.+)$")  # [composite member.]anchor.kind.parameter


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def target_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits that predict each target token (labels ≠ −100), row-major: position t−1 predicts label t."""
    return logits[:, :-1][labels[:, 1:] != -100]


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Σ over target tokens of −log p in fp32, the number of target tokens) of a causal LM's logits: cltune's
    `target_nll` on the logits at the target positions."""
    nll = target_nll(target_logits(logits, labels), labels)
    return nll.sum(), nll.numel()


def forward(model: nn.Module, inputs: dict):
    """The model's own forward of a batch's model inputs (labels and a collator's other keys left out)."""
    return model(**{k: v for k, v in inputs.items() if k in MODEL_INPUTS})


def summed_nll(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Σ over target tokens of −log p, from a forward of `inputs` (input_ids, labels, optional masks/positions)."""
    return nll_sum(forward(model, inputs).logits, inputs["labels"])[0]


class EWCPenalty:
    """λ · Σ_anchors Σ_i F_i (θ_i − θ*_i)² over the model's trainable parameters, added to every batch's loss."""

    def __init__(self, model: nn.Module, anchors: list[tuple[Tensors, Tensors]], lam: float = 10.0):
        params = trainable(model)
        missing = sorted({n for theta, _ in anchors for n in theta} - set(params))
        if missing:
            raise UserError(f"EWC: {len(missing)} anchored parameter(s) are not trainable in this model (first: "
                            f"{missing[0]}); load the adapter the anchors were taken from, trainable")
        device = next(iter(params.values())).device
        self.anchors = [({n: t.to(device) for n, t in theta.items()}, {n: f.to(device) for n, f in fisher.items()})
                        for theta, fisher in anchors]
        self.lam = lam

    @classmethod
    def from_checkpoint(cls, folder: str | Path, model: nn.Module, lam: float | None = None) -> EWCPenalty:
        """The anchors (θ*, Fisher) a cltune `ewc` or `ewc_replay` phase checkpoint saved; λ from its config unless
        given."""
        folder = Path(folder)
        path = folder / "strategy_state.safetensors"
        if not path.exists():
            raise UserError(f"{folder}: no strategy_state.safetensors; pass a phase folder of an ewc or ewc_replay run")
        anchors: dict[int, tuple[Tensors, Tensors]] = {}
        for key, value in load_file(str(path)).items():
            match = _ANCHOR.match(key)
            if match:
                theta, fisher = anchors.setdefault(int(match.group(2)), ({}, {}))
                (theta if match.group(3) == "theta" else fisher)[match.group(4)] = value
        if not anchors:
            raise UserError(f"{path}: holds no EWC anchors; pass a phase folder of an ewc or ewc_replay run")
        if lam is None:
            lam = _config_lambda(folder)
        return cls(model, [anchors[k] for k in sorted(anchors)], lam)

    @classmethod
    def estimate(cls, model: nn.Module, examples: Iterable[dict], lam: float = 10.0) -> EWCPenalty:
        """Anchors from the model as it is now: θ* its trainable weights, F the mean over `examples` (one
        utterance each: input_ids, labels, …, batch size 1) of the squared gradient of its summed target NLL,
        dropout off — cltune's Fisher."""
        params = trainable(model)
        was_training = model.training
        model.eval()
        try:
            def grads():
                for inputs in examples:
                    values = torch.autograd.grad(summed_nll(model, inputs), list(params.values()), allow_unused=True)
                    yield {n: (g if g is not None else torch.zeros_like(p))
                           for (n, p), g in zip(params.items(), values)}

            fisher = fisher_diagonal(grads())
        finally:
            model.train(was_training)
        return cls(model, [({n: p.detach().clone() for n, p in params.items()}, fisher)], lam)

    def loss(self, model: nn.Module, inputs: dict, logits: torch.Tensor) -> torch.Tensor | None:
        return ewc_penalty(trainable(model), self.anchors, self.lam) if self.lam else None

    def after_backward(self, model: nn.Module) -> None:
        pass


def _config_lambda(folder: Path) -> float:
    import yaml

    try:
        config = yaml.safe_load((folder / "config.resolved.yaml").read_text(encoding="utf-8"))
        return float(config["ewc"]["lambda"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        raise UserError(f"{folder}: no ewc.lambda in config.resolved.yaml; pass lam=") from None


class LwFDistillation:
    """Learning without Forgetting: α·T²·KL(teacher ‖ student) per target token, the teacher being the model's
    trainable weights when this object is made (the previous phase's), dropout off."""

    def __init__(self, model: nn.Module, temperature: float = 2.0, weight: float = 1.0):
        self.teacher = {n: p.detach().clone() for n, p in trainable(model).items()}
        self.temperature, self.weight = temperature, weight

    def loss(self, model: nn.Module, inputs: dict, logits: torch.Tensor) -> torch.Tensor | None:
        if self.weight == 0:
            return None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), swapped_in(trainable(model), self.teacher):
                teacher = forward(model, inputs).logits
        finally:
            model.train(was_training)
        labels = inputs["labels"]
        return lwf_loss(target_logits(logits, labels), target_logits(teacher, labels), self.temperature, self.weight)

    def after_backward(self, model: nn.Module) -> None:
        pass


class AGEMProjection:
    """A-GEM: after backward, a gradient that would raise the mean target NLL of `memory` (one batch of earlier
    datasets' utterances: input_ids, labels, …) is projected onto the half-space where it does not."""

    def __init__(self, model: nn.Module, memory: dict):
        self.memory = memory
        self.steps = self.projected = 0

    def loss(self, model: nn.Module, inputs: dict, logits: torch.Tensor) -> None:
        return None

    def reference_gradient(self, model: nn.Module, params: dict[str, nn.Parameter]) -> torch.Tensor:
        labels = self.memory["labels"]
        targets = int((labels[:, 1:] != -100).sum())
        was_training = model.training
        model.eval()
        try:
            loss = summed_nll(model, self.memory) / targets
            return flatten(torch.autograd.grad(loss, list(params.values()), allow_unused=True), params)
        finally:
            model.train(was_training)

    def after_backward(self, model: nn.Module) -> None:
        params = trainable(model)
        grad = flatten([p.grad for p in params.values()], params)
        projected = agem_project(grad, self.reference_gradient(model, params))
        self.steps += 1
        if projected is not grad:
            self.projected += 1
            _AGEMStrategy._assign(params, projected)


class ContinualMixin:
    """Mix into a `Trainer` (or TRL `SFTTrainer`) subclass: `strategies=[EWCPenalty(...), LwFDistillation(...),
    AGEMProjection(...)]` add their losses to each batch's loss and adjust the gradient after each optimizer step's
    backward."""

    def __init__(self, *args, strategies: Sequence = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.strategies = list(strategies)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The causal-LM loss from the model's own logits — Σ target NLL over the step's target count
        (`num_items_in_batch`) or the batch's — plus the strategies' losses. Computed here rather than by the
        parent class: TRL's fused LM head reads the head's base weight and misses PEFT's trainable token rows."""
        outputs = forward(model, inputs)
        nll, targets = nll_sum(outputs.logits, inputs["labels"])
        count = num_items_in_batch if num_items_in_batch is not None else targets
        loss = nll / torch.as_tensor(count, device=nll.device).clamp(min=1)
        # With gradient accumulation every micro-batch adds the extra losses; scaled as the Trainer scales its own
        # loss, they count once per optimizer step. A loss already normalized by the step's token count
        # (num_items_in_batch) is not divided by the Trainer again, so the extra losses are divided here.
        share = 1 / getattr(self, "current_gradient_accumulation_steps", 1) if self._scaled_for_accumulation(
            num_items_in_batch) else 1.0
        for strategy in self.strategies:
            extra = strategy.loss(model, inputs, outputs.logits)
            if extra is not None:
                loss = loss + extra * share
        return (loss, outputs) if return_outputs else loss

    def _scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether the Trainer leaves this loss undivided by the accumulation steps (transformers' own rule)."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the step's whole gradient is in place: before clipping and the update
            for strategy in self.strategies:
                strategy.after_backward(model)
        return loss


class ContinualTrainer(ContinualMixin, Trainer):
    """`transformers.Trainer` with cltune strategies."""


def replay_mix(new: Sequence, old: Sequence, ratio: float = 0.1, seed: int = 0):
    """The new dataset plus a seeded `ratio` share of the old one (cltune's replay sample), as a list, or as a
    `datasets.Dataset` when both are one."""
    k = max(1, round(ratio * len(old))) if ratio > 0 and len(old) else 0
    picked = sorted(random.Random(seed).sample(range(len(old)), k))  # the positions replay_sample draws
    if hasattr(new, "select") and hasattr(old, "select"):
        from datasets import concatenate_datasets

        return concatenate_datasets([new, old.select(picked)])
    return [*new, *(old[i] for i in picked)]
