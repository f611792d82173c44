"""Sweeps expand grids and reuse phase-1 checkpoints for points that share phase-1 settings."""

import csv

import pytest
import yaml

from cltune.errors import UserError
from cltune.studies.sweep import expand_grid, run_sweep

from helpers import tiny_run_config


def test_expand_grid_is_a_cartesian_product():
    assert expand_grid(["a=1,2", "b=x"]) == [{"a": "1", "b": "x"}, {"a": "2", "b": "x"}]
    with pytest.raises(UserError, match="expected KEY=V1,V2"):
        expand_grid(["a"])


def test_sweep_reuses_phase1_when_only_phase2_settings_change(tiny_model_dir, two_tasks, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", "ewc_replay",
                                                     eval={"samples_per_speaker": 0, "attribution": False})))
    md = run_sweep(config, ["ewc.lambda=0,100", "phase1.epochs=1,2"], [], tmp_path / "sweep")
    rows = list(csv.DictReader((md.parent / "sweep.csv").open()))
    assert [(r["ewc.lambda"], r["phase1.epochs"]) for r in rows] == [("0", "1"), ("0", "2"), ("100", "1"), ("100", "2")]
    assert [r["reused_phase1"] for r in rows] == ["False", "False", "True", "True"]
    # a reused phase 1 yields the very same phase-1 perplexity as the point that trained it
    assert rows[2]["phase1_task1_ppl"] == rows[0]["phase1_task1_ppl"]
    assert rows[1]["phase1_task1_ppl"] != rows[0]["phase1_task1_ppl"]
    assert (md.parent / "sweep.png").exists() and "| ewc.lambda |" in md.read_text()
