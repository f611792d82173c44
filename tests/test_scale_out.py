"""`cltune compare --ray` and `cltune sweep --ray`: the same runs as Ray tasks, the same numbers as serially."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import QUIET_EVAL, cltune_command, deterministic, tiny_run_config


def _compare(config, out, *extra, cwd):
    return subprocess.run(cltune_command("compare", config, "--strategies", "replay", "--seeds", "2", "--bootstrap",
                                         "100", "--out", out, *extra), capture_output=True, text=True, cwd=cwd)


def _relative(metrics: dict, folder) -> dict:
    """metrics.json with the compare folder taken out of where a reused phase 1 came from."""
    for phase in metrics["phases"]:
        if "phase1_from" in phase["strategy"]:
            phase["strategy"]["phase1_from"] = str(Path(phase["strategy"]["phase1_from"]).relative_to(folder))
    return metrics


def test_compare_on_a_local_ray_gives_the_serial_numbers(tiny_model_dir, two_tasks, tmp_path):
    """2 strategies × 2 seeds serially and as Ray tasks of one CPU each on a local Ray of 2 CPUs: every
    metric of every run's metrics.json is identical (one torch thread on both sides), replay still takes
    naive's phase 1 (its task waits for naive's), and each finished run gets a line saying where it ran."""
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", "naive",
                                                     eval=QUIET_EVAL)))
    serial = _compare(config, tmp_path / "serial", cwd=tmp_path)
    assert serial.returncode == 0, serial.stderr
    parallel = _compare(config, tmp_path / "ray", "--ray", "--run-cpus", "1", cwd=tmp_path)
    assert parallel.returncode == 0, parallel.stderr
    assert "ray: 4 runs, 1 CPUs each, on 1 node(s)" in parallel.stdout
    lines = [line for line in parallel.stdout.splitlines() if line.startswith("[") and " done on " in line]
    assert len(lines) == 4 and all("final mean PPL" in line for line in lines), parallel.stdout
    for strategy in ("naive", "replay"):
        for seed in (0, 1):
            name = f"{strategy}-seed{seed}"
            one, two = (_relative(json.loads((tmp_path / side / "runs" / name / "metrics.json").read_text()),
                                  tmp_path / side) for side in ("serial", "ray"))
            assert deterministic(one) == deterministic(two), name
    replayed = json.loads((tmp_path / "ray" / "runs" / "replay-seed1" / "metrics.json").read_text())
    assert replayed["phases"][0]["strategy"]["phase1_from"] == str(tmp_path / "ray" / "runs" / "naive-seed1" /
                                                                     "phase1")
    figures = [json.loads((tmp_path / side / "compare.json").read_text())["strategies"]["replay"]["final_ppl"]
               for side in ("serial", "ray")]
    assert figures[0] == figures[1]
    again = _compare(config, tmp_path / "ray", "--ray", "--run-cpus", "1", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("reused (finished earlier)") == 4, again.stdout


def test_a_failed_run_is_reported_while_the_others_finish(tiny_model_dir, two_tasks, tmp_path):
    """A run that cannot start (a file stands where its run folder goes) fails with its own one-line error; the
    other run finishes, the failure is listed with the end of its log, and the command exits 2 naming it."""
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", "naive",
                                                     eval=QUIET_EVAL)))
    out = tmp_path / "cmp"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "replay-seed0").write_text("in the way")
    proc = subprocess.run(cltune_command("compare", config, "--strategies", "replay", "--seeds", "1", "--bootstrap",
                                         "100", "--out", out, "--ray", "--run-cpus", "1"),
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "replay, seed 0: FAILED on " in proc.stdout and "1 of 2 runs failed (replay, seed 0)" in proc.stderr
    assert "replay-seed0" in proc.stdout.split("failed:")[-1]  # the end of its log says why
    assert (out / "runs" / "naive-seed0" / "metrics.json").exists()


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
        one, two = (_relative(json.loads((tmp_path / side / point / "metrics.json").read_text()), tmp_path / side)
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
