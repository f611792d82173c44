"""EWC math against hand-computed values, and a huge λ pinning the weights to θ*."""

import pytest
import torch

import cltune.studies.pipeline as pipeline
from cltune.strategies.ewc import ewc_penalty, fisher_diagonal


def test_fisher_diagonal_is_the_mean_squared_gradient():
    grads = [{"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([3.0, 0.0])}]
    torch.testing.assert_close(fisher_diagonal(grads)["a"], torch.tensor([5.0, 2.0]))
    with pytest.raises(ValueError):
        fisher_diagonal([])


def test_penalty_sums_over_tasks_without_a_half():
    params = {"a": torch.tensor([1.0, 1.0])}
    task1 = ({"a": torch.tensor([0.0, 2.0])}, {"a": torch.tensor([5.0, 2.0])})  # 5·1 + 2·1 = 7
    task2 = ({"a": torch.tensor([1.0, 3.0])}, {"a": torch.tensor([1.0, 0.5])})  # 0 + 0.5·4 = 2
    assert ewc_penalty(params, [task1], 10.0).item() == pytest.approx(70.0)
    assert ewc_penalty(params, [task1, task2], 10.0).item() == pytest.approx(90.0)


def _weighted_drift(tiny_config, captured, lam: float) -> float:
    pipeline.run_stream(tiny_config("ewc", sets=[f"ewc.lambda={lam}", "train.epochs=2"]))
    strategy = captured[-1]
    theta_star, fisher = strategy.anchors[0]
    params = strategy.ctx.trainable()
    return sum((fisher[n] * (params[n].detach() - theta_star[n]) ** 2).sum().item() for n in fisher)


def test_huge_lambda_keeps_trainable_weights_at_theta_star(tiny_config, captured):
    free = _weighted_drift(tiny_config, captured, 0.0)
    pinned = _weighted_drift(tiny_config, captured, 1e6)
    assert free > 0
    assert pinned < 0.05 * free


def test_the_fisher_squares_the_gradient_of_each_utterances_log_likelihood(tiny_config):
    """One utterance's Fisher sample is (∂ Σ_t NLL_t / ∂θ)², the square of a *sum* over its target tokens."""
    from cltune.modeling.batching import collate
    from cltune.modeling.scoring import target_nll
    from cltune.strategies.ewc import per_example_grads
    from cltune.training.session import build_session

    session = build_session(tiny_config("ewc"))
    ctx = session.ctx
    utterance = ctx.tasks[0].train[0]
    (grads,) = list(per_example_grads(ctx, [utterance]))
    batch = collate(ctx.encode([utterance]), [0], ctx.tokenizer.pad_token_id)
    params = ctx.trainable()
    ctx.scorer.eval()
    nll = target_nll(ctx.scorer(**batch.model_inputs()), batch.labels)
    assert batch.n_targets > 3
    by_sum = torch.autograd.grad(nll.sum(), list(params.values()), retain_graph=True)
    for (name, _), expected in zip(params.items(), by_sum):
        torch.testing.assert_close(grads[name], expected)
    fisher = fisher_diagonal([grads])
    name = next(n for n in fisher if "lora_B" in n)
    mean_based = (torch.autograd.grad(nll.mean(), [params[name]])[0] ** 2).sum()
    assert fisher[name].sum() == pytest.approx(batch.n_targets**2 * mean_based.item(), rel=1e-4)


def test_a_replay_fisher_without_replay_is_refused(tiny_config):
    from cltune.errors import UserError
    from cltune.training.session import build_session

    with pytest.raises(UserError, match="replay.ratio is 0"):
        build_session(tiny_config("ewc_replay", ["replay.ratio=0"]))
    assert build_session(tiny_config("ewc_replay", ["replay.ratio=0", "ewc.fisher_data=train"])).strategy.members
