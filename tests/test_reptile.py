"""reptile: the meta step and its annealing against hand-computed values, seeded episodes, the
meta-training reproduced step by step on a tiny model, and its wiring into a stream."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

import pytest
import torch

from cltune.data.split import Example, HeldOutLeakError, Split, TaskData
from cltune.modeling.batching import target_count
from cltune.strategies import reptile
from cltune.strategies.base import Context
from cltune.strategies.reptile import (
    Reptile,
    ReptileSettings,
    adapt,
    meta_step_size,
    reptile_interpolate,
    sample_episode,
)
from cltune.studies import pipeline
from cltune.training import session


def test_meta_step_size_anneals_linearly_towards_zero():
    assert [meta_step_size(i, 4, 0.1) for i in range(4)] == pytest.approx([0.1, 0.075, 0.05, 0.025])


def test_reptile_interpolate_hand_computed():
    theta = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0, -1.0]])}
    adapted = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[1.0, 1.0]])}
    out = reptile_interpolate(theta, adapted, 0.25)
    # 1 + ¼(3 − 1) = 1.5,  2 + ¼(0 − 2) = 1.5,  0 + ¼(1 − 0) = 0.25,  −1 + ¼(1 + 1) = −0.5
    assert torch.equal(out["a"], torch.tensor([1.5, 1.5])) and torch.equal(out["b"], torch.tensor([[0.25, -0.5]]))
    assert all(torch.equal(reptile_interpolate(theta, adapted, 0.0)[n], theta[n]) for n in theta)
    assert all(torch.equal(reptile_interpolate(theta, adapted, 1.0)[n], adapted[n]) for n in theta)


def _train(counts: dict[str, int], split: Split = Split.TRAIN) -> list[Example]:
    return [Example(0, s, f"<{s}>", f"{s} {i}", split, i) for s, n in counts.items() for i in range(n)]


def test_sample_episode_by_speaker_or_at_random():
    train = _train({"Host": 10, "Guest": 3})
    episodes = [sample_episode(train, 5, "speaker", random.Random(seed)) for seed in range(20)]
    assert all(len({e.speaker for e in ep}) == 1 for ep in episodes)
    assert {len(ep) for ep in episodes} == {5, 3}  # Guest has only 3 utterances; both speakers get drawn
    assert (sample_episode(train, 5, "speaker", random.Random(1))
            == sample_episode(train, 5, "speaker", random.Random(1)))
    mixed = sample_episode(train, 13, "random", random.Random(0))
    assert sorted(e.text for e in mixed) == sorted(e.text for e in train)


def test_episodes_refuse_test_utterances():
    task = TaskData(0, "t", ["Host"], {"Host": "<Host>"}, _train({"Host": 3}, Split.TEST), [], [])
    strategy = Reptile(SimpleNamespace(seed=0), {"reptile": ReptileSettings()})
    with pytest.raises(HeldOutLeakError):
        strategy.episodes(task)


def _snapshot(ctx: Context) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ctx.trainable().items()}


def test_meta_training_equals_the_reptile_formula(tiny_config):
    """Two meta-iterations (ε = 0.5, then 0.25) reproduced by hand from the same episodes."""
    config = tiny_config("reptile", ["reptile.meta_iterations=2", "reptile.meta_lr=0.5", "reptile.inner_steps=3",
                                     "reptile.episode_size=4", "reptile.inner_lr=0.01"])
    built = session.build_session(config)
    ctx, strategy, tasks = built.ctx, built.strategy, built.tasks
    theta0 = _snapshot(ctx)
    costs = strategy.before_task(tasks[0])
    meta = _snapshot(ctx)

    episodes = strategy.episodes(tasks[0])
    params = ctx.trainable()
    with torch.no_grad():
        for name, value in theta0.items():
            params[name].copy_(value)
    expected, tokens_seen = theta0, 0
    for episode, epsilon in zip(episodes, (0.5, 0.25)):
        tokens_seen += adapt(ctx, episode, 3, 0.01, "adam")
        adapted = _snapshot(ctx)
        expected = {n: expected[n] + epsilon * (adapted[n] - expected[n]) for n in theta0}
        with torch.no_grad():
            for name, value in expected.items():
                params[name].copy_(value)

    assert any(not torch.equal(meta[n], theta0[n]) for n in theta0)
    for name in theta0:
        torch.testing.assert_close(meta[name], expected[name], rtol=0, atol=1e-6)
    n_targets = sum(target_count(ids) for ep in episodes for ids in ctx.encode(ep))
    assert costs["meta_target_tokens"] == tokens_seen == 3 * n_targets
    assert costs["inner_steps"] == 6 and costs["meta_iterations"] == 2


def test_stream_meta_trains_before_phase_one_only(tiny_config, monkeypatch):
    real_adapt = reptile.adapt
    monkeypatch.setattr(reptile, "adapt", lambda *a: time.sleep(0.1) or real_adapt(*a))  # 0.1 s per episode
    metrics = pipeline.run_stream(tiny_config("reptile", ["reptile.meta_iterations=3", "reptile.inner_steps=2"]))
    # the cost is reported with phase 1, and the meta-training is inside its before_task time
    first, second = (p.strategy for p in metrics.phases)
    assert first["meta_iterations"] == 3 and first["inner_steps"] == 6
    assert first["meta_target_tokens"] > 0 and first["meta_wall_s"] >= 0.3
    assert not {"meta_wall_s", "meta_target_tokens", "meta_iterations"} & set(second)
    assert first["hooks_s"]["before_task"] >= first["meta_wall_s"] - 0.01 and second["hooks_s"]["before_task"] < 0.1
    assert not Reptile.phase1_neutral
