"""Every command end to end through the real entry point (`cltune.cli.main`, what the `cltune`
script runs), on the tiny model, asserting on what the command wrote: files, keys and values.

`COMMAND_TESTS` names the test of each command; a command added without one fails
`test_every_command_has_an_end_to_end_test`.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import run_cli, tiny_run_config

ROOT = Path(__file__).resolve().parents[1]

# Settings that make the demo config finish in seconds on the tiny model; the demo's own code path is unchanged.
TINY_DEMO = ["data.max_length=24", "train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=8",
             "model.precision=fp32", "eval.samples_per_speaker=1", "eval.max_new_tokens=4", "eval.batch_size=64"]


@pytest.fixture()
def run_yaml(tiny_model_dir, two_tasks, tmp_path) -> Path:
    """A tiny two-task ewc_replay stream as a YAML file (the way users pass configs)."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, two_tasks, tmp_path / "runs", "ewc_replay")))
    return path


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _finite_matrix(metrics: dict, tasks: int) -> list[list[float]]:
    ppl = metrics["ppl"]
    assert len(ppl) == tasks + 1 and all(len(row) == tasks for row in ppl)
    assert all(math.isfinite(v) and v > 1 for row in ppl for v in row)
    return ppl


def test_demo_data_writes_the_three_guest_files(monkeypatch, capsys, tmp_path):
    result = run_cli(monkeypatch, capsys, "demo-data", "--out", tmp_path / "data")
    assert result.code == 0, result.err
    sizes = {}
    for letter in "abc":
        path = tmp_path / "data" / f"host_guest_{letter}.csv"
        assert f"wrote {path}" in " ".join(result.out.split())
        rows = list(csv.DictReader(path.open(encoding="utf-8")))
        assert {r["speaker"] for r in rows} == {"Host", f"Guest {letter.upper()}"}
        runs = [c for i, c in enumerate(r["conversation"] for r in rows) if i == 0 or rows[i - 1]["conversation"] != c]
        assert len(runs) == len(set(runs)) >= 3  # whole conversations, each in one run of rows
        assert all(r["text"].strip() for r in rows)
        sizes[letter] = len(rows)
    assert sizes["a"] == 791 and sizes["b"] == 219  # the reference pipeline's dataset sizes


def test_demo_data_writes_more_guests_in_order_of_their_turns_with_the_host(monkeypatch, capsys, tmp_path):
    """`--guests 6`: A, B, C as always, then the host's partners with the most turns (D first), up to 400 turns each;
    the corpus has the dozen partners of 700+ turns the long-stream configs count on."""
    import json as json_

    from cltune.data.demo import GUESTS, HOST, _corpus_path, host_partners, pair_conversations

    result = run_cli(monkeypatch, capsys, "demo-data", "--out", tmp_path / "data", "--guests", "6")
    assert result.code == 0, result.err
    corpus = json_.loads(_corpus_path().read_text(encoding="utf-8"))
    partners = host_partners(corpus)
    assert sum(turns >= 700 for _, turns in partners) >= 12
    extra = [p for p, _ in partners if p not in GUESTS.values()][:3]
    for letter, partner in zip("def", extra):
        rows = list(csv.DictReader((tmp_path / "data" / f"host_guest_{letter}.csv").open(encoding="utf-8")))
        assert {r["speaker"] for r in rows} == {"Host", f"Guest {letter.upper()}"} and 200 <= len(rows) <= 400
        theirs = {t for _, turns in pair_conversations(corpus, HOST, partner) for s, t in turns if s == partner}
        assert {r["text"] for r in rows if r["speaker"] != "Host"} <= theirs  # that partner's own words
        assert len({r["conversation"] for r in rows}) >= 8  # enough conversations to split by conversation
    assert not (tmp_path / "data" / "host_guest_g.csv").exists()
    refused = run_cli(monkeypatch, capsys, "demo-data", "--out", tmp_path / "none", "--guests", "0")
    assert refused.code == 2 and "--guests 0: the demo corpus writes 1 to 26 guests" in refused.err
    assert "Traceback" not in refused.err and not (tmp_path / "none").exists()


def test_the_podcast_config_runs_the_host_and_six_guests(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """`cltune demo --config podcast`: the shipped podcast config writes the six guests it reads and runs them in
    order with the default strategy; its matrix is 7 × 6 (the tiny model, two steps a phase)."""
    monkeypatch.chdir(tmp_path)
    out, data = tmp_path / "checkpoints", tmp_path / "data"
    sets = [f"model.name={tiny_model_dir}", *TINY_DEMO, "eval.samples_per_speaker=0", "eval.attribution=false"]
    result = run_cli(monkeypatch, capsys, "demo", "--config", "podcast", "--out", out, "--data", data,
                     *[a for s in sets for a in ("--set", s)])
    assert result.code == 0, result.err
    metrics = _metrics(out / "podcast")
    assert metrics["tasks"] == [f"guest_{x}" for x in "abcdef"] and metrics["strategy"] == "progressive"
    _finite_matrix(metrics, 6)
    assert [p["steps"] for p in metrics["phases"]] == [2] * 6
    assert sorted(p.name for p in data.iterdir()) == [f"host_guest_{x}.csv" for x in "abcdef"]


def test_demo_runs_the_readme_main_job(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """`make demo` is `cltune demo`: the default demo config, here pointed at the tiny model."""
    monkeypatch.chdir(tmp_path)  # outside the repository: the demo config ships inside the package
    out, data = tmp_path / "checkpoints", tmp_path / "data"
    sets = [f"model.name={tiny_model_dir}", *TINY_DEMO]
    result = run_cli(monkeypatch, capsys, "demo", "--out", out, "--data", data,
                     *[a for s in sets for a in ("--set", s)])
    assert result.code == 0, result.err
    run_dir = out / "demo"
    metrics = _metrics(run_dir)
    assert metrics["strategy"] == "ewc_replay" and metrics["tasks"] == ["guest_a", "guest_b"]
    _finite_matrix(metrics, 2)
    assert [p["steps"] for p in metrics["phases"]] == [2, 2]
    assert (run_dir / "report.html").stat().st_size > 10_000  # plots embedded
    resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    assert [Path(t["path"]) for t in resolved["tasks"]] == [data / "host_guest_a.csv", data / "host_guest_b.csv"]
    assert resolved["ewc"]["lambda"] == 10 and resolved["replay"]["ratio"] == 0.1  # the demo config's own settings
    for d in json.loads((run_dir / "eda" / "eda.json").read_text())["datasets"]:  # split by whole conversations
        assert sum(v["conversations"] for v in d["splits"].values()) == d["conversations"] >= 3
        assert sum(v["utterances"] for v in d["splits"].values()) == d["utterances"]
    flat = " ".join(result.out.split())
    assert "Test perplexity" in flat and f"report: {run_dir / 'report.md'}" in flat
    # --resume continues a demo run (a finished one: nothing is retrained); without it the demo starts over
    # (a fresh start clears RUN/logs, where this marker sits).
    finished, marker = (run_dir / "metrics.json").read_bytes(), run_dir / "logs" / "cleared on a fresh start"
    marker.parent.mkdir(exist_ok=True)
    marker.write_text("")
    resumed = run_cli(monkeypatch, capsys, "demo", "--out", out, "--data", data,
                      *[a for s in sets for a in ("--set", s)], "--resume")
    assert resumed.code == 0, resumed.err
    assert (run_dir / "metrics.json").read_bytes() == finished and marker.exists()
    again = run_cli(monkeypatch, capsys, "demo", "--out", out, "--data", data, *[a for s in sets for a in ("--set", s)])
    assert again.code == 0, again.err
    assert not marker.exists()


def test_demo_names_the_missing_task_file(monkeypatch, capsys, tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text("tasks: [{name: x, path: data/elsewhere.csv}]\n")
    result = run_cli(monkeypatch, capsys, "demo", "--out", tmp_path / "ck", "--data", tmp_path / "data",
                     "--config", config)
    assert result.code == 2
    assert f"{tmp_path / 'data' / 'elsewhere.csv'} does not exist" in result.err and "Traceback" not in result.err


def test_eda_writes_numbers_of_each_file(monkeypatch, capsys, tmp_path, tiny_model_dir, two_tasks):
    out = tmp_path / "eda"
    result = run_cli(monkeypatch, capsys, "eda", *two_tasks, "--out", out, "--model", tiny_model_dir, "--max-len", "12")
    assert result.code == 0, result.err
    summary = json.loads((out / "eda.json").read_text())
    assert summary["max_len"] == 12 and summary["tokenizer"].endswith("tokenizer")
    a, b = summary["datasets"]
    assert (a["name"], a["utterances"], a["per_speaker"]) == ("guest_a", 60, {"Host": 30, "Guest A": 30})
    assert (b["name"], b["utterances"], b["per_speaker"]) == ("guest_b", 40, {"Host": 20, "Guest B": 20})
    assert "| guest_a | 60 |" in (out / "eda.md").read_text()
    words = run_cli(monkeypatch, capsys, "eda", two_tasks[0], "--out", tmp_path / "words", "--whitespace")
    assert words.code == 0, words.err
    counted = json.loads((tmp_path / "words" / "eda.json").read_text())["datasets"][0]
    with two_tasks[0].open() as fh:
        texts = [row["text"] for row in csv.DictReader(fh)]
    assert counted["tokens"]["mean"] == pytest.approx(sum(len(t.split()) for t in texts) / len(texts), abs=0.01)


def test_train_then_generate_then_report(monkeypatch, capsys, tmp_path, tiny_model_dir, two_tasks):
    out = tmp_path / "ckpt" / "guest_a"
    result = run_cli(monkeypatch, capsys, "train", "--data", two_tasks[0], "--out", out, "--model", tiny_model_dir,
                    "--set", "lora.r=4", "--set", "train.batch_size=8", "--set", "train.micro_batch_size=4",
                    "--set", "train.lr=5e-3", "--set", "data.max_length=24", "--set", "model.precision=fp32")
    assert result.code == 0, result.err
    phase = out / "phase1"
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.resolved.yaml",
            "train_log.jsonl", "metrics.json", "manifest.json"} <= {p.name for p in phase.iterdir()}
    record = json.loads((phase / "metrics.json").read_text())
    assert record["after"]["test_ppl"] < record["before"]["test_ppl"]
    assert f"test PPL {record['before']['test_ppl']:.2f} → {record['after']['test_ppl']:.2f}" in result.out
    log = [json.loads(line) for line in (phase / "train_log.jsonl").read_text().splitlines()]
    assert {"step", "loss", "tokens_per_s", "lr"} <= set(log[0])
    assert yaml.safe_load((phase / "config.resolved.yaml").read_text())["strategy"] == "naive"

    by_name = run_cli(monkeypatch, capsys, "generate", phase, "--speaker", "guest a", "--max-new-tokens", "6",
                      "--seed", "1")
    by_token = run_cli(monkeypatch, capsys, "generate", phase, "--speaker", "<GUEST>", "--max-new-tokens", "6",
                      "--seed", "1")
    assert by_name.code == 0 and by_token.code == 0, by_name.err + by_token.err
    assert by_name.out.strip() and by_name.out == by_token.out  # a name and its token are one speaker
    unknown = run_cli(monkeypatch, capsys, "generate", phase, "--speaker", "Nobody")
    assert unknown.code == 2 and "unknown speaker 'Nobody'" in unknown.err

    (out / "report.md").unlink(missing_ok=True)
    rebuilt = run_cli(monkeypatch, capsys, "report", out)
    assert rebuilt.code == 0, rebuilt.err
    report = (out / "report.md").read_text()
    assert f"{record['after']['test_ppl']:.2f}" in report and "guest_a" in report
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 2


def test_train_takes_paths_with_quotes_and_spaces(monkeypatch, capsys, tmp_path, tiny_model_dir, two_tasks):
    data = tmp_path / "it's here" / "O'Brien.csv"
    data.parent.mkdir()
    shutil.copy(two_tasks[0], data)
    out = tmp_path / "out put" / "it's"
    result = run_cli(monkeypatch, capsys, "train", "--data", data, "--out", out, "--model", tiny_model_dir,
                    "--set", "train.max_steps=1", "--set", "data.max_length=24", "--set", "model.precision=fp32",
                    "--set", "eval.samples_per_speaker=0")
    assert result.code == 0, result.err
    resolved = yaml.safe_load((out / "phase1" / "config.resolved.yaml").read_text())
    assert resolved["tasks"][0]["path"] == str(data) and resolved["name"] == "it's"


def test_run_writes_the_matrix_and_refuses_to_overwrite(monkeypatch, capsys, run_yaml, tmp_path):
    result = run_cli(monkeypatch, capsys, "run", run_yaml, "--set", "train.max_steps=2", "--set", "ewc.lambda=20")
    assert result.code == 0, result.err
    run_dir = tmp_path / "runs" / "tiny"
    metrics = _metrics(run_dir)
    ppl = _finite_matrix(metrics, 2)
    assert metrics["precision"] == "fp32" and metrics["strategy"] == "ewc_replay"
    assert yaml.safe_load((run_dir / "config.resolved.yaml").read_text())["ewc"]["lambda"] == 20
    assert metrics["forgetting_pct"][0] == pytest.approx(100 * (ppl[2][0] - ppl[1][0]) / ppl[1][0])
    assert {"phase1", "phase2", "report.md", "report.html", "eda"} <= {p.name for p in run_dir.iterdir()}
    flat = " ".join(result.out.split())
    assert "Test perplexity" in flat and f"{ppl[2][1]:.2f}" in flat and "report:" in flat

    second = run_cli(monkeypatch, capsys, "run", run_yaml)
    assert second.code == 2 and "already holds a run; pass --overwrite" in second.err
    replaced = run_cli(monkeypatch, capsys, "run", run_yaml, "--set", "train.max_steps=1", "--overwrite")
    assert replaced.code == 0, replaced.err
    assert [p["steps"] for p in _metrics(run_dir)["phases"]] == [1, 1]


def test_run_resume_continues_after_a_crash_in_phase_2(monkeypatch, capsys, run_yaml, tmp_path):
    """A run stopped in phase 2 and resumed ends with the uninterrupted run's metrics; phase 1 is not retrained.
    (tests/test_reliability.py also resumes after a real SIGKILL through the `cltune` process.)"""
    reference = run_cli(monkeypatch, capsys, "run", run_yaml, "--set", "name=reference")
    assert reference.code == 0, reference.err

    import cltune.studies.pipeline as pipeline

    real_train = pipeline.train_phase

    class Crash(BaseException):
        pass

    def crash_in_phase_2(ctx, strategy, task, *args):
        if task.index == 1:
            raise Crash
        return real_train(ctx, strategy, task, *args)

    monkeypatch.setattr(pipeline, "train_phase", crash_in_phase_2)
    with pytest.raises(Crash):
        run_cli(monkeypatch, capsys, "run", run_yaml)
    monkeypatch.setattr(pipeline, "train_phase", real_train)
    run_dir = tmp_path / "runs" / "tiny"
    phase1 = _metrics(run_dir)["phases"]
    assert len(phase1) == 1

    resumed = run_cli(monkeypatch, capsys, "run", run_yaml, "--resume")
    assert resumed.code == 0, resumed.err
    assert "resuming after phase 1" in " ".join(resumed.out.split())
    metrics, expected = _metrics(run_dir), _metrics(tmp_path / "runs" / "reference")
    assert metrics["phases"][0] == phase1[0]  # phase 1 comes from the saved record, wall time included
    assert metrics["ppl"] == expected["ppl"] and metrics["forgetting_pct"] == expected["forgetting_pct"]

    both = run_cli(monkeypatch, capsys, "run", run_yaml, "--resume", "--overwrite")
    assert both.code == 2 and "contradict" in both.err


def test_sweep_writes_its_table_and_reuses_phase_1(monkeypatch, capsys, run_yaml, tmp_path):
    out = tmp_path / "sweep"
    result = run_cli(monkeypatch, capsys, "sweep", run_yaml, "--grid", "ewc.lambda=0,100", "--set", "train.max_steps=2",
                    "--set", "eval.samples_per_speaker=0", "--out", out)
    assert result.code == 0, result.err
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["ewc.lambda"] for r in rows] == ["0", "100"]
    assert [r["reused_phase1"] for r in rows] == ["False", "True"]
    assert rows[0]["phase1_task1_ppl"] == rows[1]["phase1_task1_ppl"]
    assert "| ewc.lambda |" in (out / "sweep.md").read_text() and (out / "sweep.png").exists()
    assert f"sweep: {out / 'sweep.md'}" in " ".join(result.out.split())


def test_strategies_lists_the_registry(monkeypatch, capsys):
    from cltune.strategies import REGISTRY

    result = run_cli(monkeypatch, capsys, "strategies")
    assert result.code == 0
    assert re.findall(r"^([a-z_]+): ", result.out, flags=re.M) == list(REGISTRY)
    assert " ".join(REGISTRY["ewc"].summary.split()) in " ".join(result.out.split())


def test_config_reference_prints_every_key(monkeypatch, capsys):
    from cltune.studies.reference import config_reference

    printed = run_cli(monkeypatch, capsys, "config-reference")
    assert printed.code == 0 and printed.out == config_reference() + "\n"
    assert "| `lambda` | float | `10.0` |" in printed.out and "| `context_turns` |" in printed.out


def test_redirected_output_gets_plain_progress_lines(monkeypatch, capsys, run_yaml, tmp_path):
    """No live bar in a log file: a line with step, loss, tokens/s and time left instead (every 30 s; here every
    step)."""
    import re

    monkeypatch.setattr("cltune.training.loop.PLAIN_PROGRESS_S", 0.0)
    result = run_cli(monkeypatch, capsys, "run", run_yaml, "--set", "train.max_steps=3")
    assert result.code == 0, result.err
    lines = re.findall(r"phase (\d) · guest_\w: step (\d)/3, loss \d+\.\d{3}, \d+ tok/s, about [\d.]+ min left",
                       result.out)
    assert lines == [(phase, str(step)) for phase in "12" for step in (1, 2, 3)]


def test_unknown_config_key_exits_2_with_one_line(monkeypatch, capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("tasks: [{path: a.csv}]\nlearning_rate: 3\n")
    result = run_cli(monkeypatch, capsys, "run", config)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "learning_rate: unknown key" in result.err and "cltune config-reference" in result.err


def test_the_installed_script_is_the_entry_point():
    script = Path(sys.executable).with_name("cltune")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "cltune"]
    proc = subprocess.run([*command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in COMMAND_TESTS:
        assert name in proc.stdout


COMMAND_TESTS = {  # command → its end-to-end test (module::function)
    "demo-data": "test_cli.py::test_demo_data_writes_the_three_guest_files",
    "demo": "test_cli.py::test_demo_runs_the_readme_main_job",
    "eda": "test_cli.py::test_eda_writes_numbers_of_each_file",
    "train": "test_cli.py::test_train_then_generate_then_report",
    "run": "test_cli.py::test_run_writes_the_matrix_and_refuses_to_overwrite",
    "sweep": "test_cli.py::test_sweep_writes_its_table_and_reuses_phase_1",
    "compare": "test_compare.py::test_compare_end_to_end_with_figures_recomputed_by_hand",
    "report": "test_cli.py::test_train_then_generate_then_report",
    "generate": "test_cli.py::test_train_then_generate_then_report",
    "strategies": "test_cli.py::test_strategies_lists_the_registry",
    "chat": "test_context.py::test_chat_script_end_to_end",
    "export": "test_export.py::test_a_merged_export_loads_in_plain_transformers_with_the_checkpoint_logits",
    "config-reference": "test_cli.py::test_config_reference_prints_every_key",
    "init": "test_init.py::test_init_then_the_printed_command_trains_the_default_strategy",
}


def test_every_command_has_an_end_to_end_test():
    import ast

    from typer.main import get_command

    from cltune.cli import app

    assert set(get_command(app).commands) == set(COMMAND_TESTS)
    for where in COMMAND_TESTS.values():
        module, function = where.split("::")
        tree = ast.parse((ROOT / "tests" / module).read_text(encoding="utf-8"))
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, where


def test_no_command_function_is_called_from_python():
    """A Typer command called as a function gets `typer.Option` objects for its defaults (truthy: the
    `--resume` that stopped `make demo`); commands call `cltune.api`, never each other."""
    import ast

    from cltune.cli import app

    commands = {c.callback.__name__ for c in app.registered_commands}
    cli_tree = ast.parse((ROOT / "src" / "cltune" / "cli.py").read_text(encoding="utf-8"))
    calls = [f"cli.py:{n.lineno} {n.func.id}()" for n in ast.walk(cli_tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in commands]
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "cltune.cli":
                calls += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names if a.name in commands]
    assert not calls, calls
