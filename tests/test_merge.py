"""`merge`: share arithmetic and token-row merging by hand, PEFT's add_weighted_adapter wired with
the right weights, and an end-to-end stream whose merged adapter is the weighted combination."""

from __future__ import annotations

import math

import pytest
import torch
from peft.utils.merge_utils import ties
from safetensors.torch import load_file

from cltune.errors import UserError
from cltune.evaluation.evaluate import perplexity
from cltune.modeling.checkpoint import load_checkpoint
from cltune.modeling.scoring import TokenScorer
from cltune.strategies.adapters import original_token_rows, token_rows
from cltune.strategies.merge import MERGED, merge_shares, merge_token_rows, peft_weights
from cltune.studies.pipeline import run_stream
from cltune.training.session import build_session, load_tasks, make_accelerator

from helpers import PPL_ONLY


def test_merge_shares_normalize_over_the_adapters_merged_so_far():
    assert merge_shares(None, 2) == [0.5, 0.5]
    assert merge_shares([1.0, 3.0], 2) == [0.25, 0.75]
    assert merge_shares([1.0, 3.0], 1) == [1.0]  # after task 1 the merged adapter is task 1's


def test_peft_weights_undo_the_mean_of_sign_elected_merges():
    assert peft_weights([0.25, 0.75], "linear") == [0.25, 0.75]
    assert peft_weights([0.25, 0.75], "ties") == [0.5, 1.5]
    assert peft_weights([1.0], "dare_ties") == [1.0]


def test_merge_token_rows_is_the_weighted_average_of_the_deltas():
    original = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    rows = [torch.tensor([[2.0, 4.0], [1.0, 1.0]]), torch.tensor([[4.0, 0.0], [3.0, 1.0]])]
    merged = merge_token_rows(original, rows, [0.25, 0.75])
    assert torch.allclose(merged, torch.tensor([[3.5, 1.0], [2.5, 1.0]]))


def test_weights_must_match_the_task_count(tiny_config):
    config = tiny_config("merge", ["merge.weights=[1, 2, 3]"])
    with pytest.raises(UserError, match="3 weights for 2 tasks"):
        build_session(config)


def _lora_factors(model, adapter: str):
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    return (layer.lora_A[adapter].weight.detach().clone(), layer.lora_B[adapter].weight.detach().clone(),
            layer.scaling[adapter])


def test_ties_merge_gets_count_scaled_weights_and_averaged_rows(tiny_config):
    config = tiny_config("merge", ["merge.combination_type=ties", "merge.weights=[1, 3]", "merge.density=0.5"])
    session = build_session(config)
    ctx, strategy = session.ctx, session.strategy
    strategy.before_task(ctx.tasks[1])
    with torch.no_grad():  # both adapters "trained": distinct, nonzero factors and token rows
        for n, p in ctx.model.named_parameters():
            if "default" in n.split(".") or "task2" in n.split("."):
                p.add_(torch.randn_like(p))
    (a1, _, s), (a2, _, _) = _lora_factors(ctx.model, "default"), _lora_factors(ctx.model, "task2")
    rows = [token_rows(ctx.model, "default").detach().clone(), token_rows(ctx.model, "task2").detach().clone()]
    strategy.after_task(ctx.tasks[1])

    assert ctx.model.active_adapter == MERGED
    assert not any(p.requires_grad for p in ctx.model.parameters())  # the merged model is only evaluated
    merged_a, _, merged_scale = _lora_factors(ctx.model, MERGED)
    # shares 1/4, 3/4 → PEFT weights 1/2, 3/2 (×2 adapters) → A factors weighted √(w·s)
    expected = ties([a1, a2], torch.tensor([math.sqrt(0.5 * s), math.sqrt(1.5 * s)]), 0.5)
    assert merged_scale == 1.0 and torch.allclose(merged_a, expected)
    # token rows are a plain share-weighted average whatever the combination type
    assert torch.allclose(token_rows(ctx.model, MERGED), 0.25 * rows[0] + 0.75 * rows[1])
    assert not torch.allclose(original_token_rows(ctx.model, MERGED), token_rows(ctx.model, MERGED))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_default_merge_is_exact(tiny_config, precision):
    """`cat` (the default): every layer's merged ΔW is Σ w̃_i ΔW_i of the task adapters, no cross terms —
    also over a bf16 base, where PEFT would create the merged adapter in bf16."""
    session = build_session(tiny_config("merge", ["merge.weights=[1, 3]", f"model.precision={precision}"]))
    ctx, strategy = session.ctx, session.strategy
    strategy.before_task(ctx.tasks[1])
    with torch.no_grad():  # both adapters "trained": independent nonzero factors
        for n, p in ctx.model.named_parameters():
            if "default" in n.split(".") or "task2" in n.split("."):
                p.add_(torch.randn_like(p))
    strategy.after_task(ctx.tasks[1])
    q = ctx.model.get_base_model().model.layers[0].self_attn.q_proj
    want = 0.25 * q.get_delta_weight("default") + 0.75 * q.get_delta_weight("task2")
    assert q.lora_A[MERGED].weight.dtype == torch.float32
    assert torch.allclose(q.get_delta_weight(MERGED), want, atol=1e-5)
    linear = build_session(tiny_config("merge", ["merge.combination_type=linear"]))  # the old default
    assert linear.strategy.cfg.combination_type == "linear" and strategy.cfg.combination_type == "cat"


def test_stream_evaluates_every_task_with_the_linear_merge(tiny_config):
    config = tiny_config("merge", [*PPL_ONLY, "merge.combination_type=linear"])
    metrics = run_stream(config)
    ppl = metrics.ppl
    assert all(math.isfinite(v) for row in ppl for v in row)

    phase2 = config.run_dir / "phase2"
    files = {name: load_file(phase2 / sub / "adapter_model.safetensors")
             for name, sub in (("default", "."), ("task2", "task2"), (MERGED, MERGED))}
    a_keys = [k for k in files["default"] if "lora_A" in k]
    assert a_keys and files[MERGED].keys() == files["default"].keys()
    scale = config.lora.alpha / config.lora.r
    for key in files["default"]:
        if "lora_" in key:  # linear, shares ½ ½: each factor is Σ √(½·s) · factor_i
            want = math.sqrt(0.5 * scale) * (files["default"][key] + files["task2"][key])
        else:  # token rows: their average
            want = 0.5 * (files["default"][key] + files["task2"][key])
        assert torch.allclose(files[MERGED][key], want, atol=1e-6), key

    # the checkpoint is the merged model, and it reproduces the reported perplexity of task 1
    model, tokenizer, meta = load_checkpoint(phase2)
    assert meta["active_adapter"] == MERGED and model.active_adapter == MERGED
    task1 = load_tasks(config)[1][0]
    reloaded = perplexity(make_accelerator("fp32"), TokenScorer(model), tokenizer, task1.test, config.data.max_length)
    assert reloaded == pytest.approx(ppl[2][0], rel=1e-5)
