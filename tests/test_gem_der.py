"""GEM's projection and its dual solver, DER++'s stored logits and loss, and replay + LwF."""

from __future__ import annotations

import itertools

import pytest
import torch

from cltune.modeling.batching import target_count
from cltune.strategies.agem import agem_project
from cltune.strategies.der import logit_match
from cltune.strategies.gem import gem_project, nonnegative_qp
from cltune.studies import pipeline


def _brute_force_qp(gram: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """The best of every active set's unconstrained solution that is feasible: exact for tiny problems."""
    k, best, value = len(linear), None, float("inf")
    for size in range(k + 1):
        for free in itertools.combinations(range(k), size):
            v = torch.zeros(k, dtype=torch.float64)
            if free:
                index = list(free)
                v[index] = torch.linalg.solve(gram[index][:, index], -linear[index])
            if (v >= -1e-12).all() and (f := (0.5 * v @ gram @ v + linear @ v).item()) < value:
                best, value = v, f
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_nonnegative_qp_meets_the_kkt_conditions_and_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(4, 7, generator=generator, dtype=torch.float64)
    gram, linear = rows @ rows.T, torch.randn(4, generator=generator, dtype=torch.float64)
    v = nonnegative_qp(gram, linear)
    gradient = gram @ v + linear
    assert (v >= 0).all()
    assert (gradient >= -1e-7).all()  # no descent direction left inside the orthant (round-off and a 1e-10 ridge)
    assert torch.allclose(v * gradient, torch.zeros_like(v), atol=1e-7)  # complementary slackness
    torch.testing.assert_close(v, _brute_force_qp(gram, linear), atol=1e-8, rtol=1e-8)


def test_gem_leaves_a_harmless_gradient_alone_and_projects_a_conflicting_one_onto_the_cone():
    g = torch.tensor([1.0, -2.0, 0.5])
    friendly = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    assert gem_project(g, friendly) is g
    refs = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # g·g_1 = −2, g·g_2 = −0.5
    projected = gem_project(g, refs)
    assert (refs @ projected >= -1e-6).all()  # conflicts with no earlier dataset
    # The nearest such gradient: among a fine grid of feasible candidates, none is closer to g.
    grid = torch.stack(torch.meshgrid(*(torch.linspace(-3, 3, 61),) * 3, indexing="ij"), -1).reshape(-1, 3)
    feasible = grid[(grid @ refs.T >= 0).all(dim=1)]
    assert (projected - g).norm() <= (feasible - g).norm(dim=1).min() + 1e-6
    torch.testing.assert_close(projected, torch.tensor([1.0, 0.0, 0.5]))  # here: drop the −2 along g_1
    # One constraint is A-GEM's projection.
    single = torch.tensor([[1.0, 1.0, 1.0]])
    torch.testing.assert_close(gem_project(g, single), agem_project(g, single[0]))
    # The margin γ keeps every dual variable at least γ: the change is Gᵀv with v ≥ γ, still feasible.
    pushed = gem_project(g, refs, margin=0.5)
    dual = torch.linalg.lstsq(refs.T, (pushed - g)[:, None]).solution.squeeze(1)
    torch.testing.assert_close(refs.T @ dual, pushed - g)
    assert (dual >= 0.5 - 1e-5).all() and (refs @ pushed >= -1e-6).all() and not torch.allclose(pushed, projected)


def test_der_matches_logits_at_the_stored_ids():
    student = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]])
    ids = torch.tensor([[3, 2], [0, 3]], dtype=torch.int32)
    stored = torch.tensor([[4.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(logit_match(student, stored, ids), torch.tensor([(0 + 4) / 2, (1 + 0) / 2]))


def _der_run(tiny_config, captured, alpha: float):
    config = tiny_config("der", [f"der.alpha={alpha}", "der.ratio=0.3", "eval.samples_per_speaker=0"],
                         name=f"der{alpha}")
    metrics = pipeline.run_stream(config)
    return metrics, captured[-1]


def test_der_stores_the_phase_end_logits_of_its_buffer_and_pulls_towards_them(tiny_config, captured):
    metrics, der = _der_run(tiny_config, captured, 1.0)
    kept = der.buffer.examples()
    assert kept and set(der.stored) == set(kept)
    encoded = der.ctx.encode(kept)
    for example, ids in zip(kept, encoded):
        values, top = der.stored[example]
        assert values.shape == top.shape == (target_count(ids), 32)  # every target position, the 32 largest logits
        assert (values[:, :-1] >= values[:, 1:]).all()
    assert metrics.phases[1].strategy["stored_utterances"] == len(kept)
    assert metrics.phases[1].strategy["stored_logits"] == sum(v.numel() for v, _ in der.stored.values())
    # Phase 2 (buffer of task 1 only) trains with the logit term; α = 0 is plain replay of the same sample.
    plain, _ = _der_run(tiny_config, captured, 0.0)
    assert plain.ppl[1] == metrics.ppl[1] and plain.ppl[2] != metrics.ppl[2]


def test_der_state_round_trips(tiny_config, captured):
    _, der = _der_run(tiny_config, captured, 1.0)
    state = der.state()
    fresh = type(der)(der.ctx, der.settings)
    fresh.load_state({k: v.clone() for k, v in state.items()})
    assert fresh.buffer.examples() == der.buffer.examples()
    for example, (values, ids) in der.stored.items():
        assert torch.equal(fresh.stored[example][0], values) and torch.equal(fresh.stored[example][1], ids)


def test_replay_lwf_trains_on_the_replayed_utterances_and_distils(tiny_config, captured):
    metrics = pipeline.run_stream(tiny_config("replay_lwf", ["eval.samples_per_speaker=0"]))
    train = [sizes["train"] for sizes in metrics.split_sizes]
    assert [p.train_examples for p in metrics.phases] == [train[0], train[1] + round(0.1 * train[0])]
    second = metrics.phases[1].strategy
    assert second["forward_tokens"] == 2 * second["backward_tokens"]  # a teacher forward per micro-batch


def test_mer_with_gamma_one_is_replay_and_otherwise_meta_updates_each_window(tiny_config, captured):
    import math

    from cltune.strategies.mer import meta_update

    start, now = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 0.0])}
    torch.testing.assert_close(meta_update(start, now, 0.25)["w"], torch.tensor([1.5, 1.5]))
    sets = ["eval.samples_per_speaker=0", "eval.attribution=false"]
    replay = pipeline.run_stream(tiny_config("replay", sets, name="replay"))
    same = pipeline.run_stream(tiny_config("mer", [*sets, "mer.gamma=1"], name="mer1"))
    assert same.ppl == replay.ppl  # γ = 1 keeps every step's movement: plain replay of the same sample
    half = pipeline.run_stream(tiny_config("mer", [*sets, "mer.gamma=0.5", "mer.meta_every=2"], name="mer05"))
    assert half.ppl[1] != replay.ppl[1]
    for record in half.phases:
        assert record.strategy["meta_updates"] == math.ceil(record.steps / 2)
