"""`cltune init`: a starter config for the user's own files, and the command it prints trains the default
strategy as written, without any --set."""

from __future__ import annotations

import json
import math
import shlex

import yaml

from helpers import write_dialogue


def _printed_command(out: str) -> list[str]:
    """The `cltune run …` line init printed, as argv."""
    line = next(line.strip() for line in out.splitlines() if line.strip().startswith("cltune run "))
    return shlex.split(line)[1:]


def test_init_then_the_printed_command_trains_the_default_strategy(cli, tiny_model_dir, two_tasks, tmp_path,
                                                                  monkeypatch):
    """The quick start: init writes a config beside the data; its printed command, run from that folder,
    trains progressive (the default) on both files in the given order."""
    monkeypatch.chdir(tmp_path)
    first, second = two_tasks[1], two_tasks[0]  # the order the user gives, not the alphabet's
    made = cli("init", first.name, second.name, "--model", tiny_model_dir, "--out", "podcast.yaml")
    assert made.code == 0, made.err
    assert _printed_command(made.out) == ["run", "podcast.yaml"]
    text = (tmp_path / "podcast.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    assert raw["strategy"] == "progressive" and raw["name"] == "podcast"
    assert [t["name"] for t in raw["tasks"]] == ["guest_b", "guest_a"]
    assert [(t["speaker_col"], t["text_col"]) for t in raw["tasks"]] == [("speaker", "text")] * 2
    assert "token_lr" not in raw["train"]  # the new rows train at the LoRA rate: stable for every strategy
    assert "# 40 utterances; speakers Host (20), Guest B (20)" in text  # what the file holds, in words

    ran = cli(*_printed_command(made.out))
    assert ran.code == 0, ran.err
    metrics = json.loads((tmp_path / "checkpoints" / "podcast" / "metrics.json").read_text())
    assert metrics["strategy"] == "progressive" and metrics["tasks"] == ["guest_b", "guest_a"]
    assert all(math.isfinite(v) for row in metrics["ppl"] for v in row)
    assert metrics["ppl"][1][0] < metrics["ppl"][0][0]  # phase 1 learned its file


def test_init_quotes_odd_paths_and_keeps_them_relative_to_the_config(cli, tmp_path, monkeypatch):
    data = tmp_path / "my data: 'odd' #1"
    data.mkdir()
    csv = write_dialogue(data / "o'brien: talk.csv", "Guest A", 12)
    monkeypatch.chdir(tmp_path)
    made = cli("init", csv, "--out", tmp_path / "cfg" / "run.yaml")
    assert made.code == 2 and "cfg" in made.err  # the folder does not exist: said, nothing written
    (tmp_path / "cfg").mkdir()
    made = cli("init", csv, "--out", tmp_path / "cfg" / "run.yaml")
    assert made.code == 0, made.err
    raw = yaml.safe_load((tmp_path / "cfg" / "run.yaml").read_text(encoding="utf-8"))
    assert raw["tasks"][0]["path"] == "../my data: 'odd' #1/o'brien: talk.csv"


def test_init_refuses_bad_input_and_writes_nothing(cli, tmp_path, monkeypatch, two_tasks):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("who,line\nHost,hi\n", encoding="utf-8")
    result = cli("init", two_tasks[0], bad, "--out", "x.yaml")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert f"{bad}: line 1: no speaker column found" in result.err and "--speaker-col NAME" in result.err
    assert not (tmp_path / "x.yaml").exists() and not list(tmp_path.glob(".x.yaml*"))
    # The hint, followed: the columns named on the command line are written into the config.
    fixed = cli("init", bad, "--out", "x.yaml", "--speaker-col", "who", "--text-col", "line")
    assert fixed.code == 0, fixed.err
    assert yaml.safe_load((tmp_path / "x.yaml").read_text())["tasks"][0] | {"path": None} == {
        "name": "bad", "path": None, "speaker_col": "who", "text_col": "line"}
    again = cli("init", two_tasks[0], "--out", "x.yaml")
    assert again.code == 2 and "x.yaml: exists; pass --overwrite" in again.err
    assert cli("init", two_tasks[0], "--out", "x.yaml", "--overwrite").code == 0
    assert cli("init", two_tasks[0], "--out", "x.txt").code == 2
    unknown = cli("init", two_tasks[0], "--out", "y.yaml", "--strategy", "progresive")
    assert unknown.code == 2 and "did you mean progressive?" in unknown.err and not (tmp_path / "y.yaml").exists()
    assert unknown.err.startswith("error: y.yaml: strategy: unknown 'progresive'")  # the file asked for, no temp name


def test_init_names_tasks_apart_and_keeps_an_explicit_no_conversation_split(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    a = write_dialogue(tmp_path / "one" / "chat.csv", "Guest A", 12)
    b = write_dialogue(tmp_path / "two" / "chat.csv", "Guest B", 12, seed=3)
    made = cli("init", a, b, "--conversation-col", "none", "--name", "pair")
    assert made.code == 0, made.err
    raw = yaml.safe_load((tmp_path / "cltune.yaml").read_text())
    assert [t["name"] for t in raw["tasks"]] == ["chat", "chat_2"] and raw["name"] == "pair"
    assert [t["conversation_col"] for t in raw["tasks"]] == ["none", "none"]


def test_the_shipped_configs_are_in_the_wheel(tmp_path):
    """`cltune demo` reads its config from the package, so a plain `pip install` must carry it: built from a
    copy of the source, the wheel holds every config under src/cltune/configs."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    shutil.copytree(root / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(tmp_path / "wheel")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "wheel").glob("cltune-*.whl")
    shipped = {f"cltune/configs/{p.name}" for p in (root / "src" / "cltune" / "configs").glob("*.yaml")}
    assert "cltune/configs/demo.yaml" in shipped
    assert shipped <= set(zipfile.ZipFile(wheel).namelist())
