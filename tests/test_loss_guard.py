"""The training-loss guard: a rising loss that stays finite backs off the learning rates, then stops the phase."""

from __future__ import annotations

import math
import random

import pytest

from cltune.training.loop import LossGuard


def test_a_falling_or_noisy_loss_never_trips_it():
    guard, rng = LossGuard(), random.Random(0)
    # a falling trend with ±0.4 nats of step-to-step noise (length-grouped steps differ that much)
    verdicts = [guard.observe(5.0 - 0.02 * step + rng.uniform(-0.4, 0.4)) for step in range(200)]
    assert verdicts == [None] * 200
    assert guard.backed_off == 0 and guard.lowest < 5.0


def test_a_rise_of_more_than_a_nat_backs_off_twice_then_stops():
    guard = LossGuard()
    assert [guard.observe(5.0) for _ in range(10)] == [None] * 10
    # smoothed: 5.0 → 5.4 → 5.72 → 5.976 → 6.181 (> 5.0 + 1 at the 4th rising step)
    verdicts = [guard.observe(7.0) for _ in range(4)]
    assert verdicts == [None] * 3 + ["backoff"]
    smoothed, lowest = guard.tripped
    assert lowest == 5.0 and smoothed == pytest.approx(7.0 - 2.0 * 0.8**4) and smoothed > 6.0
    assert (guard.backed_off, guard.smoothed, guard.seen) == (1, None, 0)  # a new watch over the restored weights
    # the restored weights' loss is the old low: a new rise trips it again only past the warm-up
    assert [guard.observe(9.0) for _ in range(5)] == [None] * 4 + ["backoff"]
    assert [guard.observe(9.0) for _ in range(5)] == [None] * 4 + ["stop"]
    assert guard.backed_off == 2


def test_a_spike_inside_the_warm_up_counts_against_the_lowest_loss_seen():
    guard = LossGuard()
    verdicts = [guard.observe(loss) for loss in (5.7, 5.7, 5.8, 11.3, 14.0)]
    assert verdicts == [None, None, None, None, "backoff"]  # the lowest includes the first steps
    assert guard.tripped[1] == pytest.approx(5.7)


def test_a_step_of_few_tokens_moves_the_average_by_its_share_of_a_mean_step():
    """A phase's last step can hold a few tokens (21 against ~870 on a real stream) whose mean loss says little:
    weighted by tokens it moves the average by its share, where counted as a whole step it tripped the guard and
    took the whole phase's training back."""
    steps = [(4.9, 870)] * 9 + [(10.6, 21)]
    whole = LossGuard()
    assert [whole.observe(loss) for loss, _ in steps] == [None] * 9 + ["backoff"]
    weighted = LossGuard()
    assert [weighted.observe(loss, tokens) for loss, tokens in steps] == [None] * 10
    share = 21 * 10 / (9 * 870 + 21)
    assert weighted.smoothed == pytest.approx(4.9 + (10.6 - 4.9) * (1 - 0.8**share))
    assert weighted.smoothed < 4.95  # 0.03 nats up, where a whole step's weight gave 6.04
    # full steps count as whole steps (a little more: the mean step is smaller now): a rise over them still trips it
    assert [weighted.observe(7.5, 870) for _ in range(2)] == [None, "backoff"]  # 4.93 → 5.49 → 5.93 > 4.9 + 1


def test_steps_of_equal_tokens_smooth_as_steps_do():
    rng = random.Random(1)
    losses = [5.0 + rng.uniform(-1, 1) for _ in range(30)]
    plain, weighted = LossGuard(), LossGuard()
    for loss in losses:
        assert plain.observe(loss) == weighted.observe(loss, 512)
        assert weighted.smoothed == pytest.approx(plain.smoothed)


def test_its_state_is_plain_json_for_step_checkpoints():
    import json
    from dataclasses import asdict

    guard = LossGuard()
    for loss in (5.0, 5.0, 5.0, 5.0, 5.0, 9.0, 9.0, 9.0):
        guard.observe(loss)
    again = LossGuard(**json.loads(json.dumps(asdict(guard))))
    assert [again.observe(9.0) for _ in range(4)] == [guard.observe(9.0) for _ in range(4)]
    assert math.isinf(LossGuard().lowest)


def test_a_diverging_learning_rate_is_caught_in_a_real_run(tiny_config, capsys):
    """lr 2 walks the tiny model's smoothed loss from 5.7 to 12.4 by step 5 of phase 1 (9.3 in phase 2): the guard
    backs off and the run ends with perplexities near the untrained model's instead of twice them (633 on guest A
    measured without the guard, 309 untrained); lr 12 over 8 epochs keeps rising after two back-offs (each back to
    the weights the phase began with, the last validated ones) and stops with the step and the setting. (Higher
    rates over 4 epochs overflow the gradient first, which the NaN check stops with its own message.)"""
    from cltune.errors import DivergedError
    from cltune.studies.pipeline import run_stream

    sets = ["eval.attribution=false", "eval.samples_per_speaker=0"]
    metrics = run_stream(tiny_config("naive", [*sets, "train.epochs=4", "train.lr=2.0"], name="backed-off"))
    out = capsys.readouterr().out
    assert "phase 1, step 5: the training loss rose" in out and "lower train.lr (2) to avoid this" in out
    assert max(metrics.ppl[-1]) < 1.5 * max(metrics.ppl[0])
    assert metrics.phases[0].loss_guard_backoffs >= 1  # in metrics.json, where compare's runs leave no output
    with pytest.raises(DivergedError, match=r"phase 1, step \d+: the training loss keeps rising .* after the learning "
                                            r"rates were halved 2 times; lower train.lr \(12\)"):
        run_stream(tiny_config("naive", [*sets, "train.epochs=8", "train.lr=12"], name="stopped"))


def test_the_command_stops_a_diverging_run_in_one_line_with_exit_code_3(cli, tiny_model_dir, two_tasks, tmp_path):
    import yaml

    from helpers import tiny_run_config

    raw = tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs")
    raw["train"].update(lr=12.0, epochs=8)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = cli("run", config)
    assert result.code == 3, result.err
    assert "the training loss keeps rising" in result.err and "lower train.lr (12)" in result.err
    assert "Traceback" not in result.err
