"""`cltune.training.integrations`: replay, EWC, LwF and A-GEM inside `transformers.Trainer` give the loss and
gradients of cltune's own loop on the same batch, and a Trainer with them trains."""

from __future__ import annotations

import pytest
import torch

from cltune.modeling.batching import collate
from cltune.strategies.base import Outputs, StepInfo

from helpers import PPL_ONLY

STEP = StepInfo(phase=1, step=1, steps=1, epoch=0)


def _session_after_run(tiny_config, captured, strategy: str, sets=()):
    from cltune.studies.pipeline import run_stream

    config = tiny_config(strategy, [*PPL_ONLY, *sets])
    run_stream(config)
    return config, captured[-1]


def _batch(strategy, count: int = 6):
    ctx = strategy.ctx
    task = ctx.tasks[1]
    encoded = ctx.encode(task.train[:count])
    batch = collate(encoded, list(range(len(encoded))), ctx.tokenizer.pad_token_id)
    return batch, batch.model_inputs()


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _trainer(model, tmp_path, strategies, **extra):
    from transformers import TrainingArguments

    from cltune.training.integrations import ContinualTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, remove_unused_columns=False, save_strategy="no", logging_strategy="no",
                             **extra)
    return ContinualTrainer(model=model, args=args, strategies=strategies)


def _cltune_loss(strategy, batch, inputs, extra_loss: bool = True):
    """The loop's loss for a one-micro-batch step: mean target NLL, the strategy's batch loss and step penalty."""
    from cltune.modeling.scoring import target_nll

    scorer = strategy.ctx.scorer
    logits = scorer(**inputs)
    loss = target_nll(logits, inputs["labels"]).sum() / batch.n_targets
    if extra_loss and (extra := strategy.batch_loss(batch, Outputs(logits), STEP)) is not None:
        loss = loss + extra
    if (penalty := strategy.step_penalty(STEP)) is not None:
        loss = loss + penalty
    return loss


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert set(a) == set(b) and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-4, msg=name)


def test_ewc_from_a_checkpoint_gives_the_loops_loss_and_gradients(tiny_config, captured, tmp_path):
    from cltune.training.integrations import EWCPenalty

    config, strategy = _session_after_run(tiny_config, captured, "ewc_replay", ["ewc.lambda=50"])
    model = strategy.ctx.model
    model.train()
    batch, inputs = _batch(strategy)
    ewc = EWCPenalty.from_checkpoint(config.run_dir / "phase2", model)
    assert ewc.lam == 50 and len(ewc.anchors) == 2  # one anchor per finished phase
    with torch.no_grad():  # move the weights off the latest anchor, so the penalty is not zero
        for p in strategy.ctx.trainable().values():
            p.add_(0.01 * torch.randn_like(p))
    ours = _cltune_loss(strategy, batch, inputs)
    ours.backward()
    loop = _grads(model)
    theirs = _trainer(model, tmp_path, [ewc]).compute_loss(model, inputs)
    theirs.backward()
    assert ewc.loss(model, inputs, None) > 1e-3
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-5)
    _assert_same(_grads(model), loop)


def test_ewc_estimated_on_the_fly_is_cltunes_fisher(tiny_config, captured):
    from cltune.modeling.per_example import per_example_grads
    from cltune.strategies.ewc import fisher_diagonal
    from cltune.training.integrations import EWCPenalty

    _, strategy = _session_after_run(tiny_config, captured, "naive")
    ctx = strategy.ctx
    examples = ctx.tasks[0].train[:5]
    encoded = ctx.encode(examples)
    singles = [collate(encoded, [i], ctx.tokenizer.pad_token_id).model_inputs() for i in range(len(encoded))]
    ewc = EWCPenalty.estimate(ctx.model, singles, lam=3.0)
    expected = fisher_diagonal(per_example_grads(ctx, examples))
    [(theta, fisher)] = ewc.anchors
    assert set(fisher) == set(expected)
    for name in expected:
        torch.testing.assert_close(fisher[name], expected[name], atol=1e-9, rtol=1e-4)
    assert all(torch.equal(theta[n], p.detach()) for n, p in ctx.trainable().items())


def test_lwf_gives_the_loops_loss_and_gradients(tiny_config, captured, tmp_path):
    from cltune.training.integrations import LwFDistillation

    _, strategy = _session_after_run(tiny_config, captured, "lwf")
    model = strategy.ctx.model
    # the teacher: the weights now, as the strategy's after phase 2
    lwf = LwFDistillation(model, temperature=2.0, weight=1.0)
    for name, value in strategy.teacher.items():
        assert torch.equal(value, lwf.teacher[name])
    with torch.no_grad():  # the student moves away from the teacher, as training the next phase would
        for p in strategy.ctx.trainable().values():
            p.add_(0.02 * torch.randn_like(p))
    model.train()
    batch, inputs = _batch(strategy)
    ours = _cltune_loss(strategy, batch, inputs)
    ours.backward()
    loop = _grads(model)
    theirs = _trainer(model, tmp_path, [lwf]).compute_loss(model, inputs)
    theirs.backward()
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-5)
    assert lwf.loss(model, inputs, model(**inputs).logits).item() > 1e-4
    _assert_same(_grads(model), loop)


def test_agem_projects_as_the_loop_does_and_a_trainer_trains_with_it(tiny_config, captured, tmp_path):
    from cltune.training.integrations import AGEMProjection, EWCPenalty, replay_mix

    _, strategy = _session_after_run(tiny_config, captured, "agem", ["agem.memory_batch=1000"])
    ctx = strategy.ctx
    model = ctx.model
    memory = collate(strategy.encoded, list(range(len(strategy.encoded))), ctx.tokenizer.pad_token_id).model_inputs()
    agem = AGEMProjection(model, memory)
    params = ctx.trainable()
    reference = agem.reference_gradient(model, params)
    torch.testing.assert_close(reference, strategy.reference_gradient(params, STEP), atol=1e-7, rtol=1e-4)
    # a gradient that conflicts with the memory's: both must project it, identically
    conflicting = -reference + 0.1 * torch.randn_like(reference)

    def set_grad():
        offset = 0
        for p in params.values():
            p.grad = conflicting[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    set_grad()
    strategy.after_backward(STEP)
    loop = _grads(model)
    set_grad()
    agem.after_backward(model)
    _assert_same(_grads(model), loop)
    assert agem.projected == 1 and strategy.projected == 1

    # a Trainer with the strategies runs its steps: A-GEM sees every one
    encoded = ctx.encode(ctx.tasks[1].train[:8])
    pad = ctx.tokenizer.pad_token_id
    trainer = _trainer(model, tmp_path, [agem, EWCPenalty.estimate(model, [memory], lam=1.0)], max_steps=2,
                       learning_rate=1e-3)
    trainer.data_collator = lambda rows: collate(rows, list(range(len(rows))), pad).model_inputs()
    trainer.train_dataset = replay_mix(encoded, strategy.encoded, ratio=0.5, seed=0)
    assert len(trainer.train_dataset) == 8 + round(0.5 * len(strategy.encoded))
    before = {n: p.detach().clone() for n, p in params.items()}
    trainer.train()
    assert agem.steps == 1 + 2
    assert any(not torch.equal(before[n], p) for n, p in params.items())


def test_with_gradient_accumulation_the_penalty_counts_once_per_step(tiny_config, captured, tmp_path):
    """Two micro-batches per step: the step's gradient with EWC minus the one without is the penalty's gradient
    (taken once), whatever the Trainer's loss normalization."""
    from transformers import TrainerCallback

    from cltune.strategies.ewc import ewc_penalty
    from cltune.training.integrations import EWCPenalty

    _, strategy = _session_after_run(tiny_config, captured, "naive")
    ctx = strategy.ctx
    model = ctx.model
    params = ctx.trainable()
    start = {n: p.detach().clone() for n, p in params.items()}
    anchor = {n: t + 0.05 for n, t in start.items()}
    fisher = {n: torch.rand_like(t) for n, t in start.items()}
    encoded = ctx.encode(ctx.tasks[1].train[:8])
    pad = ctx.tokenizer.pad_token_id

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.grads = {n: p.grad.detach().clone() for n, p in params.items()}

    def step_gradient(strategies):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])
        capture = Capture()
        trainer = _trainer(model, tmp_path, strategies, max_steps=1, gradient_accumulation_steps=2,
                           learning_rate=0.0, max_grad_norm=1e9, seed=0)
        trainer.data_collator = lambda rows: collate(rows, list(range(len(rows))), pad).model_inputs()
        trainer.train_dataset = encoded
        trainer.add_callback(capture)
        trainer.train()
        return capture.grads

    with_penalty = step_gradient([EWCPenalty(model, [(anchor, fisher)], lam=2.0)])
    without = step_gradient([])
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(start[n])
    penalty = ewc_penalty(params, [(anchor, fisher)], 2.0)
    expected = dict(zip(params, torch.autograd.grad(penalty, list(params.values()))))
    for name in params:
        torch.testing.assert_close(with_penalty[name] - without[name], expected[name], atol=1e-6, rtol=1e-4)
