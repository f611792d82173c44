"""The step plan: wide micro-batches are halved without changing which utterances share a step,
and a run with split micro-batches learns what the unsplit run learns."""

from __future__ import annotations

import pytest
import torch

from cltune.config import PhaseSettings
from cltune.studies import pipeline
from cltune.training.loop import CPU_MICRO_BATCH_TOKENS, plan_steps, split_wide, token_budget

from helpers import prepared


def test_split_wide_halves_until_each_part_fits():
    lengths = [10, 10, 10, 10, 30, 2]
    assert split_wide([0, 1, 2, 3], lengths, 40) == [[0, 1, 2, 3]]  # 4 × 10 fits exactly
    assert split_wide([0, 1, 2, 3], lengths, 39) == [[0, 1], [2, 3]]
    assert split_wide([0, 1, 4], lengths, 50) == [[0, 1], [4]]  # 3 × 30 is too wide; 2 × 10 fits
    assert split_wide([0, 1, 4], lengths, 15) == [[0], [1], [4]]
    assert split_wide([0, 1, 4], lengths, 90) == [[0, 1, 4]]
    assert split_wide([4], lengths, 5) == [[4]]  # one utterance is never split
    assert split_wide([0, 1, 2, 3], lengths, None) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("budget", [30, 64, 120])
def test_the_budget_bounds_every_micro_batch_and_keeps_the_steps(budget):
    lengths = [3 + (i * 37) % 41 for i in range(150)]
    settings = PhaseSettings(epochs=1.5, batch_size=16, micro_batch_size=4)
    whole, split = plan_steps(lengths, settings, 7), plan_steps(lengths, settings, 7, budget)
    assert len(whole) == len(split)
    for (epoch_a, step_a), (epoch_b, step_b) in zip(whole, split):
        assert epoch_a == epoch_b
        assert [i for mb in step_a for i in mb] == [i for mb in step_b for i in mb]
        assert all(len(mb) == 1 or len(mb) * max(lengths[i] for i in mb) <= budget for mb in step_b)
    assert sum(map(len, (s for _, s in split))) > sum(map(len, (s for _, s in whole)))  # some were split


def test_auto_budget_applies_on_cpu_only():
    settings = PhaseSettings()
    assert token_budget(settings, torch.device("cpu")) == CPU_MICRO_BATCH_TOKENS
    assert token_budget(settings, torch.device("cuda")) is None
    assert token_budget(PhaseSettings(max_micro_batch_tokens=None), torch.device("cpu")) is None
    assert token_budget(PhaseSettings(max_micro_batch_tokens=48), torch.device("cuda")) == 48


def test_split_micro_batches_train_to_the_same_model(tiny_config):
    runs = {}
    for name, budget in (("whole", None), ("split", 20)):  # max_length 24, micro-batches of 4: most get split
        config = tiny_config("ewc", name=name,
                             sets=[f"train.max_micro_batch_tokens={'null' if budget is None else budget}"])
        runs[name] = pipeline.run_stream(config)
    whole, split = runs["whole"].ppl, runs["split"].ppl
    assert whole[0] == split[0]  # before training
    assert whole[1][0] != whole[0][0]  # training moved the model
    for row_a, row_b in zip(whole, split):
        assert row_a == pytest.approx(row_b, rel=1e-4)


def test_token_rows_get_their_own_learning_rate(tiny_model_dir):
    from cltune.training.loop import param_groups

    model, _, _ = prepared(tiny_model_dir)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = {n for n in trainable if "trainable_tokens_delta" in n}
    assert rows and len(rows) < len(trainable)

    same = param_groups(model, PhaseSettings())
    assert len(same) == 1 and len(same[0]["params"]) == len(trainable) and "lr" not in same[0]
    apart = param_groups(model, PhaseSettings(lr=1e-3, token_lr=5e-2))
    assert [len(g["params"]) for g in apart] == [len(trainable) - len(rows), len(rows)]
    assert {id(p) for p in apart[1]["params"]} == {id(trainable[n]) for n in rows} and apart[1]["lr"] == 5e-2

    # one AdamW step moves each parameter by about its group's rate
    optimizer = torch.optim.AdamW(apart, lr=1e-3, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    for p in trainable.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    moved = {n: (trainable[n] - before[n]).abs().max().item() for n in trainable}
    assert all(m == pytest.approx(5e-2, rel=1e-3) for n, m in moved.items() if n in rows)
    assert all(m == pytest.approx(1e-3, rel=1e-3) for n, m in moved.items() if n not in rows)


def test_the_micro_batch_size_changes_no_step():
    """Which utterances share a step depends on the seed, lengths and batch size only; each step is cut
    into micro-batches of the size asked, longest last."""
    lengths = [3 + (i * 37) % 41 for i in range(150)]
    plans = {mb: plan_steps(lengths, PhaseSettings(epochs=2, batch_size=16, micro_batch_size=mb), 7)
             for mb in (2, 4, 16)}
    assert {len(p) for p in plans.values()} == {20}  # 150 utterances: 19 groups of 8 → 10 steps per epoch
    for steps in zip(*plans.values()):
        assert len({frozenset(i for mb in step for i in mb) for _, step in steps}) == 1
        assert len({epoch for epoch, _ in steps}) == 1
    for mb, plan in plans.items():
        assert all(len(part) <= mb for _, step in plan for part in step)
        flat = [i for i in (u for part in plan[0][1] for u in part)]
        assert [lengths[i] for i in flat] == sorted(lengths[i] for i in flat)
    assert (plan_steps(lengths, PhaseSettings(batch_size=16), 7)
            == plan_steps(lengths, PhaseSettings(batch_size=16), 7, None, 8))


@pytest.mark.parametrize(("setting", "wide", "want"),
                         [("auto", True, 32), ("auto", False, 8), (4, True, 4), (16, False, 16)])
def test_auto_micro_batch_is_wide_where_matmul_units_are(setting, wide, want):
    from cltune.training.loop import micro_batch

    assert micro_batch(PhaseSettings(micro_batch_size=setting), wide) == want
