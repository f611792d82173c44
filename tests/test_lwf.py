"""LwF: the distillation KL against hand-computed values, the teacher pass, and a two-task stream."""

from __future__ import annotations

import math

import pytest
import torch

from cltune.modeling.batching import collate
from cltune.modeling.checkpoint import load_strategy_state
from cltune.strategies.base import Outputs
from cltune.strategies.lwf import LwF, distillation_kl, lwf_loss
from cltune.studies import pipeline

from helpers import QUIET_EVAL


def test_kl_matches_hand_computed_values():
    # Teacher logits (0, 0) → p_t = (1/2, 1/2). Student logits (2 ln 3, 0):
    #   T = 2 → p_s = (3/4, 1/4), KL(p_t‖p_s) = ½ln(½/¾) + ½ln(½/¼) = ½ln(4/3) = 0.143841
    #   T = 1 → p_s = (9/10, 1/10), KL = ½ln(½/0.9) + ½ln(½/0.1) = ½ln(25/9) = 0.510826
    # (the reverse direction at T = 2, KL(p_s‖p_t) = 0.130812, would fail this test)
    student = torch.tensor([[2 * math.log(3), 0.0], [1.0, 1.0]])
    teacher = torch.zeros(2, 2)
    assert distillation_kl(student, teacher, 2.0).tolist() == pytest.approx([0.143841, 0.0], abs=1e-6)
    assert distillation_kl(student, teacher, 1.0).tolist() == pytest.approx([0.510826, 0.0], abs=1e-6)
    # α · T² · mean over tokens: 0.5 · 4 · (0.143841 + 0) / 2
    assert lwf_loss(student, teacher, 2.0, 0.5).item() == pytest.approx(0.143841, abs=1e-6)




def test_teacher_pass_is_the_frozen_model_and_leaves_the_student_alone(tiny_config, captured):
    # Dropout 0.5 so that "dropout off in the teacher" is observable.
    config = tiny_config("lwf", lora={"r": 4, "alpha": 8, "dropout": 0.5}, eval=QUIET_EVAL)
    pipeline.run_stream(config)
    strategy: LwF = captured[0]
    ctx, scorer = strategy.ctx, strategy.ctx.scorer
    params = ctx.trainable()
    encoded = ctx.encode(ctx.tasks[0].train[:4])
    batch = collate(encoded, list(range(4)), ctx.tokenizer.pad_token_id)
    inputs = batch.model_inputs()

    scorer.eval()
    with torch.no_grad():
        frozen = scorer(**inputs)
        # right after after_task the teacher is the student itself: nothing to distil
        assert strategy.batch_loss(batch, Outputs(frozen), None).item() == pytest.approx(0.0, abs=1e-6)
        torch.manual_seed(1)
        for p in params.values():
            p.add_(0.2 * torch.randn_like(p))  # as if phase 3 had trained
    perturbed = {n: p.detach().clone() for n, p in params.items()}
    scorer.train()

    def student_grads(with_teacher_pass: bool):
        torch.manual_seed(2)  # the same dropout mask in both passes
        logits = scorer(**inputs)
        loss = (strategy.batch_loss(batch, Outputs(logits), None) if with_teacher_pass
                else lwf_loss(logits, frozen, 2.0, 1.0))
        return loss, torch.autograd.grad(loss, list(params.values()))

    loss, grads = student_grads(with_teacher_pass=True)
    expected_loss, expected_grads = student_grads(with_teacher_pass=False)
    # the teacher is the frozen pre-perturbation model with dropout off (deterministic in train mode)
    assert torch.allclose(strategy.teacher_logits(inputs), frozen, atol=1e-5)
    assert torch.allclose(strategy.teacher_logits(inputs), strategy.teacher_logits(inputs))
    assert loss.item() > 1e-3 and loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    # the student's backward saw the student's weights, not the teacher's that were briefly swapped in
    for g, expected in zip(grads, expected_grads):
        assert torch.allclose(g, expected, atol=1e-6)
    # same Parameter objects (the optimizer's), still trainable, with the student's values, still training
    assert all(ctx.trainable()[n] is p and p.requires_grad for n, p in params.items())
    assert all(torch.equal(p, perturbed[n]) for n, p in params.items())
    assert scorer.training

    # the checkpointed state restores the teacher exactly
    fresh = LwF(ctx, strategy.settings)
    fresh.load_state(load_strategy_state(config.run_dir / "phase2"))
    assert fresh.teacher.keys() == strategy.teacher.keys()
    assert all(torch.equal(fresh.teacher[n], t) for n, t in strategy.teacher.items())


def test_strong_distillation_keeps_task1_predictions(tiny_config):
    naive = pipeline.run_stream(tiny_config("naive", eval=QUIET_EVAL, name="naive")).ppl
    lwf = pipeline.run_stream(tiny_config("lwf", eval=QUIET_EVAL, name="lwf", lwf={"weight": 1000})).ppl
    assert lwf[1] == naive[1]  # phase 1 has no teacher: it trains exactly like naive
    naive_drift, lwf_drift = abs(naive[2][0] - naive[1][0]), abs(lwf[2][0] - lwf[1][0])
    assert naive_drift > 1.0  # phase 2 moves task-1 perplexity when nothing holds it
    assert lwf_drift < 0.6 * naive_drift
    assert lwf[2][1] > naive[2][1]  # the price: task 2 is learned less
