"""`cltune compare --ray` and `cltune sweep --ray`: the same runs as Ray tasks, the same numbers as serially."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from helpers import QUIET_EVAL, cltune_command, deterministic, phase1_relative, tiny_run_config

PLUGIN = '''from cltune.strategies.naive import Naive


class Mine(Naive):
    name = "mine"
    summary = "naive under another name, from outside the package"


STRATEGY = Mine
'''


def test_a_plugin_strategy_runs_on_the_workers_and_a_failed_run_leaves_the_others(tiny_model_dir, two_tasks,
                                                                                  tmp_path):
    """A strategy defined outside the package, named by the config's `plugins` and found through PYTHONPATH, runs
    as a Ray task like a built-in one (after naive's phase 1, which it reuses). A run that cannot start (a file
    stands where its run folder goes) fails with its own error; the others finish, the failure is listed with the
    end of its log, and the command exits 2 naming it. Without PYTHONPATH the plugin is a one-line error."""
    import os

    (tmp_path / "plugin_home").mkdir()
    (tmp_path / "plugin_home" / "my_strategies.py").write_text(PLUGIN)
    raw = tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", "naive", eval=QUIET_EVAL)
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump({**raw, "plugins": ["my_strategies"]}))
    out = tmp_path / "cmp"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "replay-seed0").write_text("in the way")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "plugin_home")}
    proc = subprocess.run(cltune_command("compare", config, "--strategies", "mine,replay", "--seeds", "1",
                                         "--bootstrap", "100", "--out", out, "--ray", "--run-cpus", "1"),
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "replay, seed 0: FAILED on " in proc.stdout and "1 of 3 runs failed (replay, seed 0)" in proc.stderr
    assert "replay-seed0" in proc.stdout.split("failed:")[-1]  # the end of its log says why
    mine = json.loads((out / "runs" / "mine-seed0" / "metrics.json").read_text())
    assert mine["strategy"] == "mine" and mine["phases"][0]["strategy"]["phase1_from"] == str(
        out / "runs" / "naive-seed0" / "phase1")
    assert (out / "runs" / "naive-seed0" / "metrics.json").exists()
    missing = subprocess.run(cltune_command("run", config), capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2
    assert "plugins: cannot import 'my_strategies' (ModuleNotFoundError" in missing.stderr
    assert missing.stderr.count("\n") == 1, missing.stderr
    (tmp_path / "plugin_home" / "clash.py").write_text(PLUGIN.replace('"mine"', '"naive"'))
    config.write_text(yaml.safe_dump({**raw, "plugins": ["clash"]}))
    clash = subprocess.run(cltune_command("run", config), capture_output=True, text=True, cwd=tmp_path, env=env)
    assert clash.returncode == 2 and "plugins: clash: strategy name 'naive' is taken" in clash.stderr, clash.stderr


def test_ray_options_without_ray_or_its_extra_are_usage_errors(cli, tiny_model_dir, two_tasks, tmp_path, monkeypatch):
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", "naive")))
    sized = cli("compare", config, "--strategies", "replay", "--run-cpus", "2")
    assert sized.code == 2 and "--run-cpus and --run-gpus size Ray tasks; add --ray" in sized.err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    missing = cli("compare", config, "--strategies", "replay", "--ray")
    assert missing.code == 2 and "Ray is not installed; pip install 'cltune[ray]'" in missing.err
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_ray_alone_means_a_local_ray_wherever_it_stands(tmp_path):
    from cltune.cli import with_optional_values

    config = tmp_path / "stream.yaml"
    config.write_text("name: x\n")
    assert with_optional_values(["compare", "c.yaml", "--ray"]) == ["compare", "c.yaml", "--ray", "local"]
    assert with_optional_values(["compare", "--ray", "--run-cpus", "1", "c.yaml"])[:3] == ["compare", "--ray", "local"]
    assert with_optional_values(["compare", "--ray", str(config)]) == ["compare", "--ray", "local", str(config)]
    assert with_optional_values(["compare", "c.yaml", "--ray", "auto"]) == ["compare", "c.yaml", "--ray", "auto"]
    assert with_optional_values(["compare", "--ray", "ray://head:10001", "c.yml"])[2] == "ray://head:10001"


def test_sweep_on_a_local_ray_gives_the_serial_rows(tiny_model_dir, two_tasks, tmp_path):
    """Two EWC strengths share phase 1 (the second point's task waits for the first's): the same sweep rows and
    the same metrics serially and as Ray tasks."""
    import csv

    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", "ewc_replay",
                                                     eval=QUIET_EVAL)))
    for side, extra in (("serial", ()), ("ray", ("--ray", "--run-cpus", "1"))):
        proc = subprocess.run(cltune_command("sweep", config, "--grid", "ewc.lambda=0,50", "--out", tmp_path / side,
                                             *extra), capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {side: list(csv.DictReader((tmp_path / side / "sweep.csv").open())) for side in ("serial", "ray")}
    for row in (*rows["serial"], *rows["ray"]):
        row.pop("wall_s")
    assert rows["serial"] == rows["ray"] and [r["reused_phase1"] for r in rows["ray"]] == ["False", "True"]
    assert rows["ray"][0]["final_task1_ppl"] != rows["ray"][1]["final_task1_ppl"]  # the strengths differ
    for point in ("point00", "point01"):
        one, two = (phase1_relative(json.loads((tmp_path / side / point / "metrics.json").read_text()), tmp_path / side)
                    for side in ("serial", "ray"))
        assert deterministic(one) == deterministic(two), point


def test_every_node_must_see_the_compare_folder(tmp_path, monkeypatch):
    """The probe pinned to each node reads a marker written in the folder: on this one-node Ray it is seen (and
    removed after); a node that reads something else is named in a one-line refusal."""
    import ray

    from cltune.errors import UserError
    from cltune.studies import scale_out

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        scale_out.check_shared_folder(ray, tmp_path)
        assert not list(tmp_path.glob(".ray-probe-*"))
        node = ray.util.get_node_ip_address()
        assert scale_out._sees(str(tmp_path / "missing"), "x") == (node, False)
        real = scale_out.atomic_write_text
        monkeypatch.setattr(scale_out, "atomic_write_text", lambda path, text: real(path, "another machine's"))
        with pytest.raises(UserError, match=f"--ray: node\\(s\\) {node} do not see .*; runs write there"):
            scale_out.check_shared_folder(ray, tmp_path)
    finally:
        ray.shutdown()

