"""Bad input at scale: generated CSV/JSONL bytes, column layouts and configs give a valid dataset
or config, or a one-line `UserError` (exit 2 from the CLI), never a traceback.

The generators and the oracle are bench/fuzz.py's (`python bench/fuzz.py --cases 10000` runs
the long version); here a fixed sample of 200 cases keeps CI to seconds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("cltune_bench_fuzz", ROOT / "bench" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fuzz = _load_bench()
SAMPLE = settings(max_examples=100, derandomize=True, database=None, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                         HealthCheck.data_too_large])


@SAMPLE
@given(case=fuzz.DATASET_CASES)
def test_generated_dialogue_files_load_or_fail_with_one_line(tmp_path, case):
    fuzz.check_dataset_case(case, tmp_path)


@SAMPLE
@given(case=fuzz.CONFIG_CASES)
def test_generated_configs_build_or_fail_with_one_line(tmp_path, case):
    fuzz.check_config_case(case, tmp_path)


def test_the_sample_reaches_every_stage():
    """The generators are not all rejections: valid datasets, valid configs and split errors occur."""
    outcomes = fuzz.run_cases(300, seed=0)
    assert not [o for o in outcomes if o.startswith("CRASH")], outcomes
    assert outcomes["valid dataset"] >= 5 and outcomes["valid config"] >= 3, outcomes
    assert any(o.startswith("split:") for o in outcomes), outcomes


@pytest.mark.parametrize("content", [
    b"speaker,text\nHost,hi\n\xff\xfe,bad\n",  # not UTF-8
    b'speaker,text\nHost,"never closed\n',  # unbalanced quote
    b"who,what\nHost,hi\n",  # no known columns
    b"speaker,text,Speaker\nHost,hi,x\n",  # duplicate columns
    b"speaker,text\nHost,\n",  # missing text
    b'"speaker\nname",text\nHost,hi\n',  # a header cell with a newline
    b"speaker,text\n" + b"Host,hi\n" * 3,  # too few rows to split
])
def test_cli_run_exits_2_with_one_line_on_bad_data(tmp_path, monkeypatch, capsys, content):
    data = tmp_path / "bad.csv"
    data.write_bytes(content)
    config = tmp_path / "run.yaml"
    config.write_text(f"name: bad\noutput_dir: {tmp_path / 'runs'}\nstrategy: naive\ntasks: [{{path: {data}}}]\n")
    code, _, err = run_cli(monkeypatch, capsys, "run", config)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(data) in err


@pytest.mark.parametrize("override", ["train.lr=[", "phase1=3", "tasks.7.path=x", "phase2.epochs=-1", "phase1.lr=.nan",
                                      "phases=3", "bogus.key=1"])
def test_cli_run_exits_2_with_one_line_on_bad_overrides(tmp_path, monkeypatch, capsys, two_tasks, override):
    config = tmp_path / "run.yaml"
    config.write_text(f"name: bad\noutput_dir: {tmp_path / 'runs'}\nstrategy: naive\n"
                      f"tasks: [{{path: {two_tasks[0]}}}, {{path: {two_tasks[1]}}}]\n")
    code, _, err = run_cli(monkeypatch, capsys, "run", config, "--set", override)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
