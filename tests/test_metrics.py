"""Continual-learning metrics against hand-computed values."""

import math

import pytest

from cltune.evaluation.metrics import bwt, forgetting_pct, fwt, peak_forgetting_pct, summary

PPL = [[100.0, 200.0, 300.0],
       [50.0, 180.0, 290.0],
       [55.0, 40.0, 250.0],
       [60.0, 44.0, 30.0]]


def test_forgetting_is_the_relative_rise_since_each_task_was_learned():
    assert forgetting_pct(PPL) == pytest.approx([100 * (60 - 50) / 50, 100 * (44 - 40) / 40])  # [20, 10]


def test_peak_forgetting_is_the_worst_rise_over_later_phases():
    # task 1 was learned at 50, rose to 80 in phase 3, recovered to 60 by the end: final +20%, peak +60%
    dip = [[100.0, 200.0, 300.0], [50.0, 180.0, 290.0], [80.0, 40.0, 250.0], [60.0, 44.0, 30.0]]
    assert forgetting_pct(dip) == pytest.approx([20.0, 10.0])
    assert peak_forgetting_pct(dip) == pytest.approx([60.0, 10.0])
    assert peak_forgetting_pct(PPL) == pytest.approx([20.0, 10.0])  # no dip: the same as final
    assert summary(dip)["max_peak_forgetting_pct"] == pytest.approx(60.0)


def test_bwt_and_fwt_on_log_ppl():
    assert bwt(PPL) == pytest.approx(((math.log(50) - math.log(60)) + (math.log(40) - math.log(44))) / 2)
    assert fwt(PPL) == pytest.approx(((math.log(200) - math.log(180)) + (math.log(300) - math.log(250))) / 2)


def test_summary_and_shape_checks():
    s = summary(PPL)
    assert s["max_forgetting_pct"] == pytest.approx(20.0)
    assert s["avg_final_ppl"] == pytest.approx((60 + 44 + 30) / 3)
    assert summary([[10.0], [5.0]])["bwt"] is None
    with pytest.raises(ValueError):
        forgetting_pct([[1.0, 2.0], [1.0, 2.0]])
