"""The step plan: wide micro-batches are halved without changing which utterances share a step,
and a run with split micro-batches learns what the unsplit run learns."""

from __future__ import annotations

import pytest
import torch

from cltune import pipeline
from cltune.config import PhaseSettings
from cltune.train import CPU_MICRO_BATCH_TOKENS, plan_steps, split_wide, token_budget


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
        config = tiny_config("ewc", name=name, sets=[f"train.max_micro_batch_tokens={'null' if budget is None else budget}"])
        runs[name] = pipeline.run(config)
    whole, split = runs["whole"]["ppl"], runs["split"]["ppl"]
    assert whole[0] == split[0]  # before training
    assert whole[1][0] != whole[0][0]  # training moved the model
    for row_a, row_b in zip(whole, split):
        assert row_a == pytest.approx(row_b, rel=1e-4)
