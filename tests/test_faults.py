"""Faults a real user meets, each injected and its outcome asserted (docs: Troubleshooting → Faults cltune handles):
odd paths, two runs into one folder, a full disk, Ctrl-C and SIGTERM, an unwritable output folder,
damaged files, and inputs of a million rows or a 100 MB cell.

Every command test in the suite also runs under a temporary folder whose path holds a quote, double
quotes, a space and non-ASCII letters (conftest.py); `test_every_test_folder_has_an_odd_path` checks it.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cltune.storage import files
from cltune.storage.runlock import LOCK_FILE, claim
from cltune.storage.verified import verify
from cltune.training import interrupt

from helpers import cltune_command, deterministic, disk_full, flip_byte, raw_config, run_cli, write_dialogue

# Each optimizer step says where it is (its work's `where`) and sleeps a little, so that a signal sent
# at a given step lands inside it.
SLOW = ("import time, cltune.training.loop as t; step = t._optimizer_step; "
        "t._optimizer_step = lambda work: (print('STEP', work.where, flush=True), time.sleep(0.4), step(work))[2]; "
        "from cltune.cli import main; main()")


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs compare exactly with CLI subprocesses


def _write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def _one_line_error(err: str, *needles: str) -> None:
    """stderr is exactly one `error: ...` line holding every needle (no traceback)."""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith(".tmp") or p.name == LOCK_FILE)


def _resume_command(err: str) -> list[str]:
    """The command the error message says continues the run, as a subprocess command line."""
    words = shlex.split(err.split("continue with: ", 1)[1].strip())
    assert words[0] == "cltune" and words[-1] == "--resume", words
    return cltune_command(*words[1:])


# --- paths -------------------------------------------------------------------------------------


def test_every_test_folder_has_an_odd_path(tmp_path):
    assert all(c in str(tmp_path) for c in ("'", '"', " ", "é")), tmp_path


def test_home_and_relative_paths_in_flags_and_configs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    home = tmp_path / "hôme of O'Brien"
    (home / "dáta").mkdir(parents=True)
    write_dialogue(home / "dáta" / "it's a.csv", "Guest A", 60, 1)
    write_dialogue(home / "dáta" / "b b.csv", "Guest B", 40, 2)
    shutil.copytree(tiny_model_dir, home / "mó del")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    raw = raw_config(tiny_model_dir, home, "naive", name="it's", max_steps=1)
    raw |= {"output_dir": "~/rüns", "tasks": [{"path": "~/dáta/it's a.csv"}, {"path": "dáta/b b.csv"}]}
    _write(home / "cónfigs" / "my run.yaml", raw)
    code, _, err = run_cli(monkeypatch, capsys, "run", "~/cónfigs/my run.yaml", "--set", "eval.samples_per_speaker=0")
    assert code == 0, err
    run_dir = home / "rüns" / "it's"
    resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text(encoding="utf-8"))
    assert [t["path"] for t in resolved["tasks"]] == [str(home / "dáta" / "it's a.csv"), "dáta/b b.csv"]
    # `--out=~/...` reaches the program unexpanded (no shell expands a tilde after `=`)
    for argv in (["report", "~/rüns/it's"],
                 ["generate", "~/rüns/it's/phase2", "--speaker", "Host", "--max-new-tokens", "2"],
                 ["export", "~/rüns/it's/phase2", "--out=~/ex port/é", "--adapter"],
                 ["eda", "~/dáta/it's a.csv", "--out=~/é da", "--whitespace"],
                 ["train", "--data=~/dáta/b b.csv", "--out=rel/it's", "--model=~/mó del", "--set",
                  "train.max_steps=1", "--set", "eval.samples_per_speaker=0", "--set", "data.max_length=24"]):
        code, _, err = run_cli(monkeypatch, capsys, *argv)
        assert code == 0, (argv, err)
    assert (run_dir / "report.md").exists() and (home / "ex port" / "é" / "adapter_model.safetensors").exists()
    assert json.loads((home / "é da" / "eda.json").read_text())["datasets"][0]["utterances"] == 60
    assert (home / "rel" / "it's" / "phase1" / "manifest.json").exists()
    assert not (home / "~").exists() and not (tmp_path / "~").exists()


# --- two runs into one run folder --------------------------------------------------------------


HOLD = "import sys, time; from pathlib import Path; from cltune.storage.runlock import claim\n" \
       "with claim(Path(sys.argv[1])):\n" \
       "    print('held', flush=True); time.sleep(float(sys.argv[2]))"


def test_a_second_run_into_a_busy_folder_refuses_and_changes_nothing(reference, stream, tiny_model_dir, monkeypatch,
                                                                      capsys):
    run_dir = stream / "runs" / "reference"
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        config = _write(stream / "busy.yaml", raw_config(tiny_model_dir, stream, name="reference"))
        for flag in ("--overwrite", "--resume"):
            code, _, err = run_cli(monkeypatch, capsys, "run", config, flag)
            assert code == 2, err
            _one_line_error(err, str(run_dir), "another cltune run is using this run folder", f"PID {holder.pid}")
    finally:
        holder.kill()  # as kill -9 would: its lock file stays behind, stale
        holder.wait()
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != LOCK_FILE} == before
    from cltune.cli import main

    monkeypatch.setattr(sys, "argv", ["cltune", "run", str(config), "--resume"])
    main()  # the finished run, continued: nothing to train, the report rewritten
    out = " ".join(capsys.readouterr().out.split())
    assert f"note: {run_dir / LOCK_FILE}: taking over a stale lock (PID {holder.pid}" in out, out
    assert not (run_dir / LOCK_FILE).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "t",
                                                 "command": "cltune run x"}))
    notes = []
    with claim(run_dir, notify=notes.append):
        owner = json.loads((run_dir / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid()
        with claim(run_dir):  # the same process again (a sweep's runs inside a command): re-entrant
            pass
        assert (run_dir / LOCK_FILE).exists()
    assert len(notes) == 1 and f"PID {dead.pid}" in notes[0] and "stale lock" in notes[0]
    assert not (run_dir / LOCK_FILE).exists()


@pytest.mark.parametrize("env,main", [({}, True), ({"RANK": "1"}, False), ({"PMI_RANK": "1"}, False),
                                      ({"OMPI_COMM_WORLD_RANK": "0"}, True)])
def test_only_the_main_process_of_a_launched_run_holds_the_folder(monkeypatch, tmp_path, env, main):
    """torchrun/accelerate launch set RANK, MPI launchers their own variables: each non-main process holds nothing."""
    from cltune.storage.runlock import main_process

    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main_process() is main
    with claim(tmp_path / "run", enabled=main_process()):
        assert (tmp_path / "run" / LOCK_FILE).exists() is main


def test_of_processes_claiming_one_folder_at_once_exactly_one_wins(tmp_path):
    claimants = [subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run"), "6"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outcomes = [c.communicate() for c in claimants]
    assert sum(out.strip() == "held" for out, _ in outcomes) == 1, outcomes
    assert sum("another cltune run is using this run folder" in err for _, err in outcomes) == 3, outcomes


# --- a full disk -------------------------------------------------------------------------------


def test_disk_full_at_a_checkpoint_then_resume_once_space_is_back(reference, stream, tiny_model_dir, tmp_path,
                                                                   monkeypatch, capsys):
    from cltune.training import resume as resuming

    config = _write(tmp_path / "full.yaml",
                    raw_config(tiny_model_dir, stream, name="full") | {"output_dir": str(tmp_path)})
    original = resuming._torch_save

    def fill_up(obj, path):  # the disk fills during phase 2's first step checkpoint
        return disk_full() if "phase2" in str(path) else original(obj, path)

    with monkeypatch.context() as patch:
        patch.setattr(resuming, "_torch_save", fill_up)
        code, _, err = run_cli(monkeypatch, capsys, "run", config)
    assert code == 2
    _one_line_error(err, "step-000002: no space left on device", "nothing already on disk was replaced",
                    "continue with: cltune run")
    run_dir = tmp_path / "full"
    verify(run_dir / "phase1")
    assert _leftovers(run_dir) == [] and not list(run_dir.glob("steps/phase2/step-*"))
    resumed = subprocess.run(_resume_command(err), capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert deterministic(json.loads((run_dir / "metrics.json").read_text())) == deterministic(reference)


def test_train_stopped_by_a_full_disk_resumes_with_the_command_it_names(tiny_model_dir, two_tasks, tmp_path,
                                                                         monkeypatch, capsys):
    from cltune.training import resume as resuming

    settings = ["--model", tiny_model_dir, "--set", "train.checkpoint_every=2", "--set", "data.max_length=24",
                "--set", "model.precision=fp32", "--set", "eval.samples_per_speaker=0", "--set", "lora.dropout=0.1"]
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", two_tasks[0], "--out", tmp_path / "whole", *settings)
    assert code == 0, err
    original, saves = resuming._torch_save, []

    def fill_up(obj, path):  # the second step checkpoint runs out of space
        saves.append(path)
        return disk_full() if len(saves) > 2 else original(obj, path)

    with monkeypatch.context() as patch:
        patch.setattr(resuming, "_torch_save", fill_up)
        code, _, err = run_cli(monkeypatch, capsys, "train", "--data", two_tasks[0], "--out", tmp_path / "it's",
                               *settings, "--overwrite")
    assert code == 2
    _one_line_error(err, "step-000004: no space left on device", "; continue with: cltune train --data")
    words = shlex.split(err.split("continue with: ", 1)[1])
    assert "--overwrite" not in words and words[-1] == "--resume"
    verify(tmp_path / "it's" / "steps" / "phase1" / "step-000002")  # what the resume continues from
    code, _, err = run_cli(monkeypatch, capsys, *words[1:])
    assert code == 0, err
    whole, resumed = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("whole", "it's"))
    assert deterministic(resumed) == deterministic(whole)


def test_disk_full_while_writing_the_report_keeps_the_previous_one(reference, stream, tmp_path, monkeypatch, capsys):
    run_dir = shutil.copytree(stream / "runs" / "reference", tmp_path / "run")
    code, _, err = run_cli(monkeypatch, capsys, "report", run_dir)
    assert code == 0, err
    before = (run_dir / "report.md").read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(files.os, "fsync", disk_full)
        code, _, err = run_cli(monkeypatch, capsys, "report", run_dir)
    assert code == 2
    _one_line_error(err, "report.md: no space left on device")
    assert (run_dir / "report.md").read_bytes() == before and _leftovers(run_dir) == []


# --- Ctrl-C and SIGTERM ------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_phase_saves_a_step_checkpoint_and_resume_continues(reference, stream, tiny_model_dir, tmp_path,
                                                                         signum):
    raw = raw_config(tiny_model_dir, stream, name="signalled", checkpoint_every=100) | {"output_dir": str(tmp_path)}
    config = _write(tmp_path / "signalled.yaml", raw)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cltune_command("run", config, code=SLOW), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "signalled"
    for line in proc.stdout:  # phase 2 has 4 steps: the signal lands in its second (or, on a busy machine, later)
        if line.startswith("STEP phase 2, step 2"):
            proc.send_signal(signum)
            break
    err = proc.communicate()[1]
    assert proc.returncode == 128 + signum, err
    last = err.strip().splitlines()[-1]
    name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
    assert last.startswith(f"error: stopped by {name} in phase 2 at step "), err
    step = int(last.split(" at step ")[1].split()[0])
    assert step >= 2
    saved = run_dir / "steps" / "phase2" / f"step-{step:06d}"
    verify(saved)  # checkpoint_every is 100: this one was saved because of the signal
    assert _leftovers(run_dir) == [] and len(json.loads((run_dir / "metrics.json").read_text())["phases"]) == 1
    resumed = subprocess.run(_resume_command(last), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert deterministic(json.loads((run_dir / "metrics.json").read_text())) == deterministic(reference)


# Building the run's session (model loading) says so and then takes a while: a signal sent then lands outside the loop.
SLOW_START = ("import time, cltune.training.session as s\n"
              "def slow(*a, **k):\n    print('BUILDING', flush=True); time.sleep(60)\n"
              "s.build_session = slow\nfrom cltune.cli import main; main()")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_before_training_stops_at_once_with_the_continue_command(tiny_model_dir, stream, tmp_path, signum):
    config = _write(tmp_path / "early.yaml",
                    raw_config(tiny_model_dir, stream, name="early") | {"output_dir": str(tmp_path)})
    proc = subprocess.Popen(cltune_command("run", config, code=SLOW_START), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "BUILDING"
    proc.send_signal(signum)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signum, err
    name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
    _one_line_error(err, f"error: stopped by {name}; continue with: cltune run {shlex.quote(str(config))} --resume")
    assert not (tmp_path / "early").exists()  # the lock released, the folder it had created removed


def test_a_second_signal_or_one_outside_the_loop_stops_at_once():
    with interrupt.handlers():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        with pytest.raises(interrupt.Interrupted) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert stopped.value.exit_code == 143
        with interrupt.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert interrupt.requested() == signal.SIGTERM  # the first only asks the loop to stop
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert interrupt.requested() is None
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


CHILD = ("import os, signal, sys, time; from pathlib import Path; out = Path(sys.argv[1])\n"
         "signal.signal(signal.SIGINT, lambda *a: (out.write_text(f'SIGINT {os.getsid(0) == os.getpid()}'), "
         "sys.exit(7)))\n"
         "out.write_text('ready'); time.sleep(60)")


def test_compare_passes_one_ctrl_c_to_its_running_child_and_waits_for_it(tmp_path):
    """Ctrl-C at the terminal reaches `cltune compare` alone (its runs have their own session); it passes
    it on once, so the run stops at the end of a step with a checkpoint, and only then stops itself."""
    import threading

    from cltune.studies.compare import _run_child

    said = tmp_path / "child says"

    def ctrl_c_once_ready():
        while not (said.exists() and said.read_text() == "ready"):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    # Python's own Ctrl-C handler for the duration, whatever an earlier test in this worker process left (a library's
    # C-level handler included: signal.signal installs the interpreter's again). Seen once: no KeyboardInterrupt here.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=ctrl_c_once_ready, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            _run_child([sys.executable, "-c", CHILD, str(said)])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert said.read_text() == "SIGINT True"  # one SIGINT, to a child in a session of its own; it had exited


# --- unwritable output -------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["a file in the way", "read-only file system"])
def test_an_unwritable_output_folder_is_refused_before_training(tiny_model_dir, two_tasks, tmp_path, monkeypatch,
                                                                capsys, fault):
    import cltune.training.session

    blocked = tmp_path / "blocked"
    if fault == "a file in the way":
        blocked.write_text("a file, not a folder")
        out, reason = blocked / "sub" / "run", "Not a directory"
    else:
        blocked.mkdir()
        out, reason = blocked / "run", "Read-only file system"
        for method in ("mkdir", "write_bytes", "write_text", "touch"):  # as on a read-only mount, even for root
            def read_only(self, *args, real=getattr(Path, method), **kwargs):
                if self.is_relative_to(blocked):
                    raise OSError(errno.EROFS, "Read-only file system", str(self))
                return real(self, *args, **kwargs)

            monkeypatch.setattr(Path, method, read_only)
    monkeypatch.setattr(cltune.training.session, "build_session", lambda *a, **k: pytest.fail("training started"))
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", two_tasks[0], "--out", out,
                           "--model", tiny_model_dir)
    assert code == 2
    _one_line_error(err, str(out), "cannot write the run folder here", reason)
    assert not out.exists()
    code, _, err = run_cli(monkeypatch, capsys, "demo-data", "--out", out)
    assert code == 2
    _one_line_error(err, "cannot write the demo corpus here", reason)


def test_missing_output_parents_are_created(monkeypatch, capsys, tmp_path):
    out = tmp_path / "not" / "yet" / "there"
    code, _, err = run_cli(monkeypatch, capsys, "demo-data", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["host_guest_a.csv", "host_guest_b.csv", "host_guest_c.csv"]


# --- damaged files -----------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = [  # (command, file under the run folder, damage); a phase folder's file is named by its folder's check
    ("resume", "metrics.json", _truncate),
    ("resume", "config.resolved.yaml", lambda p: p.write_text("name: [unclosed\n")),
    ("resume", "inputs.json", lambda p: p.write_text('{"not": "a list"}')),
    ("resume", "phase2/adapter_model.safetensors", _truncate),
    ("resume", "phase2/manifest.json", _truncate),
    ("generate", "phase2/adapter_model.safetensors", _truncate),
    ("generate", "phase2/tokenizer.json", lambda p: flip_byte(p, at=100)),
    ("generate", "phase2/checkpoint.json", _truncate),
    ("chat", "phase2/router.json", lambda p: flip_byte(p, at=3)),
    ("export", "phase2/adapter_model.safetensors", lambda p: flip_byte(p)),
    ("report", "metrics.json", _truncate),
    ("report", "phase1/train_log.jsonl", lambda p: flip_byte(p, at=2)),
    ("report", "eda/eda.json", _truncate),
]


@pytest.mark.parametrize("command,name,damage", DAMAGE, ids=[f"{c}-{n}" for c, n, _ in DAMAGE])
def test_a_damaged_file_is_refused_naming_it(reference, stream, tiny_model_dir, tmp_path, monkeypatch, capsys, command,
                                             name, damage):
    run_dir = shutil.copytree(stream / "runs" / "reference", tmp_path / "reference")  # the same run, moved
    damaged = run_dir / name
    damage(damaged)
    phase, script = run_dir / "phase2", tmp_path / "turns.txt"
    script.write_text("hello there\n", encoding="utf-8")
    argv = {"resume": ["run", _write(tmp_path / "run.yaml", raw_config(tiny_model_dir, stream, name="reference") |
                                     {"output_dir": str(tmp_path)}), "--resume"],
            "generate": ["generate", phase, "--speaker", "Host", "--max-new-tokens", "2"],
            "chat": ["chat", phase, "--as", "Guest A", "--script", script],
            "export": ["export", phase, "--out", tmp_path / "export"],
            "report": ["report", run_dir]}[command]
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    code, _, err = run_cli(monkeypatch, capsys, *argv)
    assert code == 2
    in_phase_folder = name.startswith("phase")
    _one_line_error(err, f"{damaged.parent}: {damaged.name}" if in_phase_folder else str(damaged))
    assert not (tmp_path / "export").exists()
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before  # refused, nothing written


# --- big inputs --------------------------------------------------------------------------------


def _peak_rss_mb(argv: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `argv` in a fresh child of a fresh process: its exit, peak RSS (MB) and wall time (s)."""
    probe = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(json.dumps([p.returncode, p.stdout, p.stderr, "
             "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.perf_counter() - t]))")
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True).stdout
    code, stdout, stderr, peak, wall = json.loads(out)
    return subprocess.CompletedProcess(argv, code, stdout, stderr), peak, wall


ROWS = 1_000_000


def test_a_million_row_csv_loads_validates_and_runs_eda_in_bounded_memory(tmp_path):
    path = tmp_path / "big.csv"
    words = "so tell me what do you think about that question today i really love pizza and music".split()
    with path.open("w", encoding="utf-8") as fh:
        fh.write("conversation,speaker,text\n")
        for i in range(ROWS):  # 15 different lengths, 50,000 conversations of 20 turns
            fh.write(f"{i // 20},{'Host' if i % 2 == 0 else 'Guest A'},{' '.join(words[: 3 + i % 15])}\n")
    result, peak, wall = _peak_rss_mb(cltune_command("eda", path, "--whitespace", "--out", tmp_path / "eda"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "eda" / "eda.json").read_text())["datasets"][0]
    assert summary["utterances"] == ROWS and summary["conversations"] == ROWS // 20
    lengths = [3 + i % 15 for i in range(ROWS)]
    assert summary["tokens"] == {"min": 3, "max": 17, "median": statistics.median(lengths), "mean": round(
        statistics.fmean(lengths), 2), "p90": sorted(lengths)[int(0.9 * ROWS)], "share_within_max_len": 1.0}
    assert (tmp_path / "eda" / "eda.json").stat().st_size < 100_000  # length histograms, not a million numbers
    print(f"1,000,000 rows ({path.stat().st_size / 1e6:.0f} MB): eda peak RSS {peak:.0f} MB, {wall:.1f} s")
    assert peak < 500, peak  # reading the whole file into memory, as before, took 620 MB for the load alone

    with path.open("a", encoding="utf-8") as fh:  # a bad row at the very end is still found, by its line
        fh.write(f"{ROWS},Host,\n")
    result, _, _ = _peak_rss_mb(cltune_command("eda", path, "--whitespace", "--out", tmp_path / "eda2"))
    assert result.returncode == 2
    _one_line_error(result.stderr, f"line {ROWS + 2}: missing text")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_100_mb_cell_is_refused_in_bounded_memory(tmp_path, suffix):
    path = tmp_path / f"huge{suffix}"
    # CSV: a quoted cell of 100 MB over many lines (an unclosed quote); JSONL: a 100 MB line
    chunk = ("word " * 1000 + "\n") * 200 if suffix == ".csv" else "word " * 200_000  # 1 MB
    with path.open("w", encoding="utf-8") as fh:
        fh.write('speaker,text\nHost,hello\nGuest,"' if suffix == ".csv" else
                 '{"speaker": "Host", "text": "hello"}\n{"speaker": "Guest", "text": "')
        for _ in range(100):
            fh.write(chunk)
        fh.write('"\n' if suffix == ".csv" else '"}\n')
    result, peak, _ = _peak_rss_mb(cltune_command("eda", path, "--whitespace", "--out", tmp_path / "eda"))
    assert result.returncode == 2
    _one_line_error(result.stderr, f"{path}: line {3 if suffix == '.csv' else 2}: ")
    assert ("a cell holds more than 131,072 characters" in result.stderr if suffix == ".csv"
            else "longer than 16,777,216 characters" in result.stderr)
    assert peak < 400, peak
    assert not (tmp_path / "eda").exists()
