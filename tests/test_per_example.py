"""Per-utterance gradients from batched passes equal one backward per utterance, for every trainable
weight (LoRA factors, the new token rows tied into the LM head), in fp32 and bf16 runs."""

from __future__ import annotations

import pytest
import torch

from cltune.modeling.per_example import _linear_layers, _passes, indexed_grads, per_example_grads
from cltune.training.session import build_session


def _session(tiny_config, precision: str = "fp32"):
    session = build_session(tiny_config("ewc", [f"model.precision={precision}"]))
    with torch.no_grad():  # trained-looking weights: LoRA B starts at zero, which would hide lora_A's gradients
        for p in session.ctx.trainable().values():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return session


def _in_order(ctx, examples, batch_size):
    found = dict(indexed_grads(ctx, examples, batch_size))
    assert sorted(found) == list(range(len(examples)))
    return [found[i] for i in range(len(examples))]


def _assert_same(batched, reference, params):
    assert len(batched) == len(reference)
    for got, want in zip(batched, reference):
        assert got.keys() == want.keys() == params.keys()
        for name in params:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_batched_per_utterance_gradients_equal_one_backward_each(tiny_config, precision):
    session = _session(tiny_config, precision)
    ctx = session.ctx
    examples = ctx.tasks[0].train[:11] + ctx.tasks[1].train[:4]  # two speakers' tokens, many lengths
    params = ctx.trainable()
    assert _linear_layers(ctx.model, params) is not None  # the batched path applies
    assert any("trainable_tokens" in n for n in params) and any("lora_A" in n for n in params)
    reference = list(per_example_grads(ctx, examples, batch_size=1))
    assert all(any(g.abs().sum() > 0 for g in grads.values()) for grads in reference)
    for batch_size in (2, 3, 8):
        _assert_same(_in_order(ctx, examples, batch_size), reference, params)
    if precision == "bf16":  # the base is bf16 again afterwards
        assert ctx.model.get_base_model().model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_a_trainable_weight_outside_lora_and_token_rows_falls_back_to_one_backward_each(tiny_config):
    session = _session(tiny_config)
    ctx = session.ctx
    norm = ctx.model.get_base_model().model.norm.weight
    norm.requires_grad_(True)
    params = ctx.trainable()
    assert _linear_layers(ctx.model, params) is None
    examples = ctx.tasks[0].train[:5]
    batched = _in_order(ctx, examples, 4)
    assert any(g[next(n for n in params if n.endswith("model.norm.weight"))].abs().sum() > 0 for g in batched)
    _assert_same(batched, list(per_example_grads(ctx, examples, batch_size=1)), params)


def test_passes_group_similar_lengths_within_the_row_and_position_budget(monkeypatch):
    from cltune.modeling import per_example

    monkeypatch.setattr(per_example, "PASS_POSITIONS", 30)
    lengths = [5, 12, 3, 40, 6, 7, 11, 4]
    passes = _passes(lengths, 3)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    assert passes == [[2, 7, 0], [4, 5], [6, 1], [3]]  # 3·5, 2·7, 2·12 positions; 40 alone
    assert all(len(p) * max(lengths[i] for i in p) <= 30 for p in passes if len(p) > 1)
