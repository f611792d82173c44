"""`cltune compare --ray` and `cltune sweep --ray`: the same runs as Ray tasks, the same numbers as serially."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import QUIET_EVAL, cltune_command, deterministic, phase1_relative, tiny_run_config

DOOMED = '''import os
import signal
import time
from pathlib import Path

from cltune.strategies.naive import Naive


class Doomed(Naive):
    name = "doomed"
    summary = "naive, whose process kills the Ray worker that started it at phase 2's step 3 (once per marker)"

    def after_step(self, step):
        marker = Path(os.environ["DOOMED_MARKER"])
        if step.phase == 1 and step.step == 3 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(120)  # the kernel ends this process with its worker; an orphan would be seen alive
            os._exit(1)


STRATEGY = Doomed
'''

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
    for option in ("--run-cpus", "--retries"):
        sized = cli("compare", config, "--strategies", "replay", option, "2")
        assert sized.code == 2 and "--run-cpus, --run-gpus and --retries are for Ray tasks; add --ray" in sized.err
    negative = cli("sweep", config, "--grid", "train.lr=1e-3", "--ray", "--retries", "-1")
    assert negative.code == 2 and "--retries: 0 or more" in negative.err
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


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").exists() and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_a_run_whose_worker_dies_is_resumed_on_another_and_ends_as_if_nothing_happened(tiny_model_dir, tmp_path):
    """A run's process kills its Ray worker (SIGKILL) in phase 2, after a step checkpoint. With --retries 0 the run
    is reported failed (worker died), the other run finishes, and the run's process died with its worker (no orphan
    writing on). Rerun with the default one retry: the run resumes from its checkpoint, its worker is killed again,
    the retry resumes it once more on a live worker, and it ends with naive's figures exactly (it is naive, with
    naive's phase 1, one thread on both)."""
    import os

    from helpers import raw_config

    (tmp_path / "plugin_home").mkdir()
    (tmp_path / "plugin_home" / "doomed.py").write_text(DOOMED)
    raw = raw_config(tiny_model_dir, tmp_path, "naive", checkpoint_every=2)
    raw["eval"] = QUIET_EVAL
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump({**raw, "plugins": ["doomed"]}))
    marker = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "plugin_home"), "DOOMED_MARKER": str(marker)}
    command = cltune_command("compare", config, "--strategies", "doomed", "--seeds", "1", "--bootstrap", "50",
                             "--out", tmp_path / "cmp", "--ray", "--run-cpus", "1")
    failed = subprocess.run([*command, "--retries", "0"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "doomed, seed 0: FAILED" in failed.stdout and "its worker died (" in failed.stdout, failed.stdout
    assert "1 of 2 runs failed (doomed, seed 0)" in failed.stderr
    assert not _alive(int(marker.read_text()))  # the kernel ended the run's process with its worker
    run_dir = tmp_path / "cmp" / "runs" / "doomed-seed0"
    assert (run_dir / "steps" / "phase2" / "step-000002").is_dir()  # what the retry resumes from
    assert len(json.loads((run_dir / "metrics.json").read_text())["phases"]) == 1  # phase 2 never finished

    marker.unlink()
    retried = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "naive, seed 0: reused (finished earlier)" in retried.stdout
    assert "doomed, seed 0: its worker died (" in retried.stdout and "(retry 1 of 1)" in retried.stdout
    assert "[1/1] doomed, seed 0: done on " in retried.stdout, retried.stdout
    doomed = json.loads((run_dir / "metrics.json").read_text())
    naive = json.loads((tmp_path / "cmp" / "runs" / "naive-seed0" / "metrics.json").read_text())
    assert doomed["ppl"] == naive["ppl"] and doomed["ppl"][-1][0] > 1
    assert [(p["target_tokens"], p["best_val_loss"], p["after"]) for p in doomed["phases"]] == \
        [(p["target_tokens"], p["best_val_loss"], p["after"]) for p in naive["phases"]]


def test_ctrl_c_stops_every_ray_run_at_a_step_checkpoint_and_names_the_command_that_continues(tiny_model_dir,
                                                                                               tmp_path):
    """Ctrl-C (SIGINT to the command) while two runs train side by side: both save a step checkpoint and stop, the
    command exits 130 naming the command that continues, and no run process is left behind."""
    import signal
    import time

    from helpers import raw_config

    raw = raw_config(tiny_model_dir, tmp_path, "naive", checkpoint_every=1, epochs=30)
    raw["eval"] = QUIET_EVAL
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "sweep"
    command = cltune_command("sweep", config, "--grid", "train.lr=1e-3,2e-3", "--out", out, "--ray", "--run-cpus", "1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 240
    # both runs are training: each saved a step (one run keeps several step folders, so count the runs)
    while len({step.parts[-4] for step in out.glob("point*/steps/phase1/step-*")}) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stdout + stderr
    assert "Ctrl-C: stopping 2 running run(s) at their next step checkpoint" in stdout
    assert "0 of 2 runs finished and 2 stopped at a step checkpoint" in stderr, stderr
    assert "continue with: cltune sweep " in stderr and "--ray --run-cpus 1" in stderr, stderr
    left = [p for p in Path("/proc").glob("[0-9]*") if _cmdline(p).find(str(out)) >= 0 and " run " in _cmdline(p)]
    assert not left, [_cmdline(p) for p in left]
    assert not (out / ".stop").exists()
    assert not list(out.glob("point*/metrics.json"))


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class _Cluster:
    """What `per_run_resources` asks of Ray: its nodes and their resources."""

    def __init__(self, *nodes):
        self._nodes = [{"Alive": True, "Resources": r} for r in nodes] + [{"Alive": False, "Resources": {"CPU": 64}}]

    def nodes(self):
        return self._nodes


def test_a_run_must_fit_on_one_node_and_the_default_fills_gpus_first():
    """Resources are asked per node: a run larger than every node would wait forever in Ray's queue, so it is a
    usage error naming the nodes' sizes (a dead node does not count). The default: one GPU per run where some node
    has one, with up to 4 CPUs of such a node; else 4 CPUs, or all of a smaller node."""
    from cltune.errors import UserError
    from cltune.studies.scale_out import per_run_resources

    mixed = _Cluster({"CPU": 8}, {"CPU": 2, "GPU": 1})
    assert per_run_resources(mixed, None, None) == (2.0, 1.0)
    assert per_run_resources(mixed, 6, 0) == (6, 0)
    assert per_run_resources(_Cluster({"CPU": 2}), None, None) == (2.0, 0.0)
    assert per_run_resources(_Cluster({"CPU": 16, "GPU": 8}), None, 0.25) == (4.0, 0.25)  # 4 runs a GPU
    with pytest.raises(UserError, match=r"--run-cpus 3 / --run-gpus 1: no node of the Ray cluster has that much "
                                        r"\(its nodes have 2 CPUs and 1 GPUs, 8 CPUs and 0 GPUs\)"):
        per_run_resources(mixed, 3, 1)
    with pytest.raises(UserError, match="no node of the Ray cluster has that much"):
        per_run_resources(mixed, 32, None)
    with pytest.raises(UserError, match="--run-cpus must be above 0"):
        per_run_resources(mixed, 0, None)
