"""`olora`: the orthogonality and L2 losses by hand, the exact fold of the task adapters into one
summed adapter, and an end-to-end stream in which the orthogonality loss falls while task 1's
LoRA and speaker rows stay frozen."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from cltune.api import make_config
from cltune.evaluation.evaluate import perplexity
from cltune.modeling.checkpoint import load_checkpoint
from cltune.modeling.scoring import TokenScorer
from cltune.strategies import olora
from cltune.strategies.adapters import token_rows
from cltune.strategies.olora import SUMMED, OLoRA, l2_loss, orthogonality_loss
from cltune.studies.pipeline import run_stream
from cltune.training.session import build_session, load_tasks, make_accelerator

from helpers import PPL_ONLY, logits_of, tiny_run_config, write_dialogue


def test_orthogonality_loss_sums_absolute_entries_over_layers():
    layer1 = (torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]]))  # [[1], [1]] → 2
    layer2 = (torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0, 3.0], [0.0, 1.0]]))  # [[-1, -1]] → 2
    assert orthogonality_loss([layer1, layer2]).item() == 4.0
    assert orthogonality_loss([(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]]))]).item() == 0.0
    assert orthogonality_loss([]).item() == 0.0


def test_orthogonality_gradient_pushes_the_new_rows_off_the_past_ones():
    new = torch.tensor([[1.0, 1.0]], requires_grad=True)
    orthogonality_loss([(torch.tensor([[1.0, 2.0]]), new)]).backward()  # d|a·n|/dn = sign(3)·a
    assert new.grad.tolist() == [[1.0, 2.0]]


def test_l2_loss_is_the_squared_norm():
    assert l2_loss([torch.tensor([[1.0, 2.0]]), torch.tensor([3.0])]).item() == 14.0


def _train_stand_in(model, adapter: str) -> None:
    """Move an adapter's LoRA factors as training would, so that folds have something to keep."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if adapter in n.split(".") and "lora_" in n:
                p.add_(0.3 * torch.randn_like(p))


@pytest.fixture()
def three_task_config(tiny_model_dir, two_tasks, tmp_path):
    third = write_dialogue(tmp_path / "guest_a_again.csv", "Guest A", 40, 3)
    return make_config(tiny_run_config(tiny_model_dir, [*two_tasks, third], tmp_path / "runs", "olora"))


def test_folds_keep_the_model_and_stack_the_subspaces(three_task_config):
    config = three_task_config
    session = build_session(config)
    ctx, strategy = session.ctx, session.strategy
    task1, task2, task3 = ctx.tasks
    q = ctx.model.get_base_model().model.layers[0].self_attn.q_proj
    s, r = config.lora.alpha / config.lora.r, config.lora.r

    strategy.before_task(task1)
    assert strategy.step_penalty(None) is None  # λ2 = 0 and no past subspace: plain LoRA
    _train_stand_in(ctx.model, "default")
    strategy.after_task(task1)
    assert list(ctx.model.peft_config) == ["default"]  # one adapter needs no sum

    strategy.before_task(task2)
    trainable = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
    assert trainable and all("task2" in n.split(".") for n in trainable)
    assert torch.equal(token_rows(ctx.model, "task2"), token_rows(ctx.model, "default"))  # rows carry over
    # only <GUEST_B>'s row is new in task 2; [PAD], <HOST>, <GUEST_A> belong to the past
    fresh = [t for t, free in zip(ctx.new_token_ids, strategy.row_mask.tolist()) if free]
    assert ctx.tokenizer.convert_ids_to_tokens(fresh) == [task2.tokens["Guest B"]]
    assert q.active_adapters == ["default", "task2"]
    assert torch.equal(strategy.pairs[0][0], q.lora_A["default"].weight)
    # a random new A is not orthogonal to the past: λ1 · Σ |A_past A_newᵀ|
    assert strategy.step_penalty(None).item() == pytest.approx(
        0.5 * sum((past @ new.T).abs().sum().item() for past, new in strategy.pairs))
    _train_stand_in(ctx.model, "task2")
    before = logits_of(ctx, task2.test)
    strategy.after_task(task2)
    assert list(ctx.model.peft_config) == ["default", "task2", SUMMED] and ctx.model.active_adapter == SUMMED
    assert q.active_adapters == [SUMMED] and not any(p.requires_grad for p in ctx.model.parameters())
    assert ctx.model.peft_config[SUMMED].r == 2 * r
    assert torch.allclose(q.lora_A[SUMMED].weight,
                          s * torch.cat([q.lora_A["default"].weight, q.lora_A["task2"].weight]))
    assert torch.allclose(logits_of(ctx, task2.test), before, atol=1e-5)  # the fold is exact
    assert strategy.step_penalty(None) is None  # nothing trains at rest

    strategy.before_task(task3)  # the speakers of task 3 are all known: no token row trains
    assert not strategy.row_mask.any() and not token_rows(ctx.model, "task3").requires_grad
    assert torch.equal(strategy.pairs[0][0], torch.cat([q.lora_A["default"].weight, q.lora_A["task2"].weight]))
    _train_stand_in(ctx.model, "task3")
    before = logits_of(ctx, task3.test)
    strategy.after_task(task3)  # the sum is rebuilt from the three task adapters
    assert list(ctx.model.peft_config) == ["default", "task2", "task3", SUMMED]
    assert ctx.model.peft_config[SUMMED].r == 3 * r and q.lora_A[SUMMED].weight.shape[0] == 3 * r
    assert torch.allclose(logits_of(ctx, task3.test), before, atol=1e-5)


def test_stream_lowers_the_orthogonality_loss_and_freezes_the_past(tiny_config, monkeypatch):
    seen: list[float] = []
    original = olora.orthogonality_loss

    def recording(pairs):
        value = original(pairs)
        seen.append(value.item())
        return value

    monkeypatch.setattr(olora, "orthogonality_loss", recording)
    config = tiny_config("olora", ["phase2.epochs=3", *PPL_ONLY])
    metrics = run_stream(config)
    assert seen and seen[-1] < 0.5 * seen[0], (seen[0], seen[-1])  # the new subspace turned away from the past
    assert all(math.isfinite(v) for row in metrics.ppl for v in row)

    phase1, phase2 = config.run_dir / "phase1", config.run_dir / "phase2"
    first = load_file(phase1 / "adapter_model.safetensors")
    assert all(torch.equal(v, load_file(phase2 / "adapter_model.safetensors")[k]) for k, v in first.items())
    new = load_file(phase2 / "task2" / "adapter_model.safetensors")
    summed = load_file(phase2 / SUMMED / "adapter_model.safetensors")
    s = config.lora.alpha / config.lora.r
    for key, value in first.items():
        if "lora_A" in key:
            assert torch.allclose(summed[key], s * torch.cat([value, new[key]])), key
        elif "lora_B" in key:
            assert torch.equal(summed[key], torch.cat([value, new[key]], dim=1)), key

    model, tokenizer, meta = load_checkpoint(phase2)
    rows_key = next(k for k in first if "trainable_tokens_delta" in k)
    ids = tokenizer.convert_tokens_to_ids(["[PAD]", *sorted(metrics.speaker_tokens.values())])
    changed = (first[rows_key] != new[rows_key]).any(dim=1).tolist()
    guest_b = ids.index(tokenizer.convert_tokens_to_ids(metrics.speaker_tokens["Guest B"]))
    assert changed == [i == guest_b for i in range(len(ids))]  # only the new speaker's row trained
    assert torch.equal(summed[rows_key], new[rows_key])

    assert meta["active_adapter"] == SUMMED and model.active_adapter == SUMMED
    task1 = load_tasks(config)[1][0]
    reloaded = perplexity(make_accelerator("fp32"), TokenScorer(model), tokenizer, task1.test, config.data.max_length)
    assert reloaded == pytest.approx(metrics.ppl[2][0], rel=1e-5)


class _Killed(Exception):
    """Stands in for a process killed mid-phase."""


def test_a_stream_resumed_mid_phase_equals_an_uninterrupted_one(tiny_config, monkeypatch):
    uninterrupted = run_stream(tiny_config("olora", PPL_ONLY, name="whole")).ppl
    steps = {"done": 0}

    def killed_in_phase2(self, step):
        steps["done"] += 1
        if steps["done"] == 8:  # phase 1 takes 6 steps: killed 2 steps into phase 2
            raise _Killed

    config = tiny_config("olora", ["phase2.checkpoint_every=1", *PPL_ONLY], name="killed")
    with monkeypatch.context() as patch:
        patch.setattr(OLoRA, "after_step", killed_in_phase2)
        with pytest.raises(_Killed):
            run_stream(config)
    assert list((config.run_dir / "steps" / "phase2").glob("step-*"))  # it resumes inside phase 2
    assert run_stream(config, resume=True).ppl == uninterrupted
