"""Replay buffer selection: random (the reference pipeline's), highest-loss and a fixed-size reservoir."""

from __future__ import annotations

import pytest

from cltune.data.split import Example, Split, TaskData
from cltune.strategies import replay
from cltune.strategies.replay import ReplayBuffer, ReplaySettings, highest_loss
from cltune.studies import pipeline


def _task(index: int, n: int) -> TaskData:
    train = [Example(index, "Host", "<HOST>", f"t{index} u{i}", Split.TRAIN, i) for i in range(n)]
    return TaskData(index, f"task{index}", ["Host"], {"Host": "<HOST>"}, train, [], [])


def test_highest_loss_keeps_the_hardest_utterances_in_their_order():
    task = _task(0, 10)
    losses = [0.5, 3.0, 1.0, 2.5, 0.1, 3.0, 0.2, 0.3, 2.9, 0.4]
    assert [e.line for e in highest_loss(task.train, losses, 0.3)] == [1, 5, 8]
    assert [e.line for e in highest_loss(task.train, losses, 0.3, cap=2)] == [1, 5]  # ties: earlier first
    buffer = ReplayBuffer(ReplaySettings(ratio=0.3, selection="highest_loss"), seed=0)
    with pytest.raises(ValueError, match="needs the utterances' losses"):
        buffer.add(task)
    assert [e.line for e in buffer.add(task, losses)] == [1, 5, 8]


def test_the_reservoir_keeps_a_fixed_size_and_every_utterance_equally_likely():
    shares = []
    for seed in range(300):
        buffer = ReplayBuffer(ReplaySettings(ratio=0.2, selection="reservoir"), seed=seed)
        for index in range(3):
            buffer.add(_task(index, 50))
            assert len(buffer.examples()) == 10  # ceil(0.2 × 50), set by the first dataset
        assert buffer.seen == 150 and all(v for v in buffer.samples.values())  # no empty per-task lists
        shares.append([len(buffer.samples.get(i, [])) / 10 for i in range(3)])
    mean = [sum(s[i] for s in shares) / len(shares) for i in range(3)]
    assert mean == pytest.approx([1 / 3] * 3, abs=0.04)  # 50 of 150 each: a third of the slots on average
    again = ReplayBuffer(ReplaySettings(ratio=0.2, selection="reservoir", capacity=7), seed=0)
    for index in range(3):
        again.add(_task(index, 50))
    assert len(again.examples()) == 7 and again.capacity == 7


def test_a_run_keeps_the_highest_loss_utterances_of_the_finished_phase(tiny_config, captured, monkeypatch):
    seen = []

    def fake_losses(ctx, examples):  # the wiring: the finished task's training split, scored once
        seen.append([e.line for e in examples])
        return [float(e.line % 7) for e in examples]

    monkeypatch.setattr(replay, "utterance_losses", fake_losses)
    pipeline.run_stream(tiny_config("replay", ["replay.selection=highest_loss", "replay.ratio=0.2",
                                        "eval.samples_per_speaker=0"]))
    strategy = captured[-1]
    train = strategy.ctx.tasks[0].train
    assert seen[0] == [e.line for e in train]
    kept = strategy.buffer.samples[0]
    assert len(kept) == round(0.2 * len(train)) and min(e.line % 7 for e in kept) >= max(
        e.line % 7 for e in train if e not in kept)


def test_utterance_losses_are_each_utterances_mean_target_nll(tiny_config):
    import math

    from cltune.evaluation.evaluate import perplexity
    from cltune.training.session import build_session

    ctx = build_session(tiny_config("replay")).ctx
    examples = ctx.tasks[0].train[:3]
    losses = replay.utterance_losses(ctx, examples)
    for example, loss in zip(examples, losses):
        alone = math.log(perplexity(ctx.accelerator, ctx.scorer, ctx.tokenizer, [example], ctx.max_length))
        assert loss == pytest.approx(alone, rel=1e-5)
    assert len(set(losses)) == 3


def test_a_reservoir_buffer_survives_a_checkpoint(tiny_config, captured):
    metrics = pipeline.run_stream(tiny_config("replay", ["replay.selection=reservoir", "replay.capacity=5",
                                                  "eval.samples_per_speaker=0"]))
    strategy = captured[-1]
    assert len(strategy.buffer.examples()) == 5 and metrics.phases[1].strategy["stored_utterances"] == 5
    fresh = type(strategy)(strategy.ctx, strategy.settings)
    fresh.load_state({k: v.clone() for k, v in strategy.state().items()})
    assert fresh.buffer.samples == strategy.buffer.samples
    assert (fresh.buffer.seen, fresh.buffer.capacity) == (sum(len(t.train) for t in strategy.ctx.tasks), 5)


def test_a_shared_budget_keeps_the_new_datas_step_count_and_an_added_one_lengthens_the_phase(tiny_config):
    from helpers import PPL_ONLY

    def steps(strategy, sets=()):
        sets = [*PPL_ONLY, "replay.ratio=0.5", "train.batch_size=4", *sets]
        metrics = pipeline.run_stream(tiny_config(strategy, sets, name=f"{strategy}-{len(sets)}"))
        return [phase.steps for phase in metrics.phases]

    naive, added, shared = steps("naive"), steps("replay"), steps("replay", ["replay.budget=shared"])
    assert shared == naive  # the same optimizer steps as the new data alone
    assert added[0] == naive[0] and added[1] > naive[1]  # phase 2 also walks through the replayed half of task 1
    # and ewc_replay (replay inside a composite) honours it too
    assert steps("ewc_replay", ["replay.budget=shared"]) == naive
