"""Every error message that suggests a fix suggests one that works: each case runs the failing command,
checks the message (exit code 2, one line, the hint), then runs the command the hint leads to and checks
that it gets past that error. The troubleshooting page's error table lists exactly these cases."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from helpers import tiny_run_config, write_dialogue

PAGE = Path(__file__).resolve().parents[1] / "docs" / "howto" / "troubleshooting.md"
FAST = ["--set", "train.max_steps=1", "--set", "eval.attribution=false", "--set", "eval.samples_per_speaker=0"]


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _csv_bytes(path: Path, text: str, encoding: str) -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def _run_yaml(folder: Path, model: Path, csvs: list[Path]) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(model, csvs, folder / "runs")), encoding="utf-8")
    return path


def _chat(folder: Path, guest: str = "Guest A") -> Path:
    return write_dialogue(folder / f"{guest.lower().replace(' ', '_')}.csv", guest, 24)


# id → (setup(folder, model) → (failing argv, what the message says, argv after following the hint)).
HINTS = {
    "unknown-command": lambda f, m: (["trian", "--help"], "No such command 'trian'. Did you mean 'train'?",
                                     ["train", "--help"]),
    "unknown-option": lambda f, m: (["eda", _chat(f), "--ot", f / "eda", "--whitespace"],
                                    "No such option: --ot (Possible options: --out)",
                                    ["eda", _chat(f), "--out", f / "eda", "--whitespace"]),
    "no-speaker-column": lambda f, m: (
        ["eda", _csv(f / "t.csv", "who,line\nHost,hi there\nGuest,hello\n"), "--whitespace", "--out", f / "e"],
        "no speaker column found among (who, line); add a header row with one of",
        ["eda", f / "t.csv", "--whitespace", "--out", f / "e", "--speaker-col", "who", "--text-col", "line"]),
    "no-such-column": lambda f, m: (
        ["eda", _chat(f), "--whitespace", "--out", f / "e", "--speaker-col", "whom"],
        "no column named whom (columns: speaker, text); fix --speaker-col NAME",
        ["eda", _chat(f), "--whitespace", "--out", f / "e", "--speaker-col", "speaker"]),
    "two-speaker-columns": lambda f, m: (
        ["eda", _csv(f / "t.csv", "speaker,name,text\nHost,H,hi there\nGuest,G,hello\n"), "--whitespace",
         "--out", f / "e"],
        "columns 'speaker', 'name' could each be the speaker column; pass --speaker-col NAME",
        ["eda", f / "t.csv", "--whitespace", "--out", f / "e", "--speaker-col", "name"]),
    "not-utf8": lambda f, m: (
        ["eda", _csv_bytes(f / "l.csv", "speaker,text\nHost,café\nGuest,olé\n", "latin-1"), "--whitespace",
         "--out", f / "e"],
        "line 2: byte 0xe9 at offset 21 is not UTF-8; re-save the file with UTF-8 encoding",
        ["eda", _csv_bytes(f / "l-resaved.csv", "speaker,text\nHost,café\nGuest,olé\n", "utf-8"), "--whitespace",
         "--out", f / "e"]),
    "model-not-found": lambda f, m: (
        ["train", "--data", _chat(f), "--out", f / "t", "--model", f / "nowhere", *FAST],
        "pass an existing model folder (--model PATH for init, train and eda; --set model.name=PATH for run)",
        ["train", "--data", _chat(f), "--out", f / "t", "--model", m, *FAST]),
    "empty-conversation-id": lambda f, m: (
        ["eda", _csv(f / "c.csv", "conversation,speaker,text\n1,Host,hi\n,Guest,hey\n"), "--whitespace",
         "--out", f / "e"],
        "empty conversation id in column 'conversation'; fill it in, or pass --conversation-col none",
        ["eda", f / "c.csv", "--whitespace", "--out", f / "e", "--conversation-col", "none"]),
    "config-typo": lambda f, m: (
        ["run", _run_yaml(f, m, [_chat(f)]), *FAST, "--set", "train.epoch=1"],
        "train.epoch: unknown key (did you mean train.epochs?)",
        ["run", f / "run.yaml", *FAST, "--set", "train.epochs=1"]),
    "unknown-strategy": lambda f, m: (
        ["run", _run_yaml(f, m, [_chat(f)]), *FAST, "--set", "strategy=progresive"],
        "strategy: unknown 'progresive' (did you mean progressive?)",
        ["run", f / "run.yaml", *FAST, "--set", "strategy=progressive"]),
    "missing-text": lambda f, m: (
        ["run", _run_yaml(f, m, [_csv(f / "gaps.csv", _chat(f).read_text() + "Host,\n")]), *FAST],
        "missing text in column 'text'; fill it in, delete the row, or drop such rows: --drop-missing (eda, init), "
        "--set data.drop_missing=true (run, train)",
        ["run", f / "run.yaml", *FAST, "--set", "data.drop_missing=true"]),
    "missing-text-init": lambda f, m: (
        ["init", _csv(f / "gaps.csv", _chat(f).read_text() + "Host,\n"), "--out", f / "gaps.yaml"],
        "missing text in column 'text'; fill it in, delete the row, or drop such rows: --drop-missing (eda, init)",
        ["init", f / "gaps.csv", "--out", f / "gaps.yaml", "--drop-missing"]),
    "init-exists": lambda f, m: (
        ["init", _chat(f), "--out", _csv(f / "cltune.yaml", "")],
        "cltune.yaml: exists; pass --overwrite to replace it",
        ["init", _chat(f), "--out", f / "cltune.yaml", "--overwrite"]),
    "checkpoint-not-found": lambda f, m: (
        ["generate", f / "nowhere", "--speaker", "Host"],
        "no such folder; pass a phase folder of a run, e.g. checkpoints/demo/phase2",
        None),  # the example is a path to follow, not to paste: the next case follows it with a real run
}
NEEDS_A_RUN = {  # cases whose failing command needs a finished run folder first
    "run-folder-exists": lambda f, run: (
        ["run", f / "run.yaml", *FAST], "already holds a run; pass --overwrite to replace it",
        ["run", f / "run.yaml", *FAST, "--overwrite"]),
    "run-folder-is-not-a-checkpoint": lambda f, run: (
        ["generate", run, "--speaker", "Host", "--max-new-tokens", "2"],
        "a run folder, not a checkpoint; pass one of its phase folders:",
        ["generate", run / "phase1", "--speaker", "Host", "--max-new-tokens", "2"]),
}


def _check(cli, failing, says, fixed) -> None:
    result = cli(*failing)
    message = " ".join(result.err.split())
    assert result.code == 2 and says in message, (failing, result.err)
    assert "Traceback" not in result.out + result.err
    if not result.err.startswith("Usage:"):  # cltune's own errors are one line; Click's bring the usage line
        assert len(result.err.strip().splitlines()) == 1, result.err
    if fixed is not None:
        after = cli(*fixed)
        assert after.code == 0, (fixed, after.err)


@pytest.mark.parametrize("case", sorted(HINTS))
def test_the_hint_works(case, cli, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _check(cli, *HINTS[case](tmp_path, tiny_model_dir))


@pytest.mark.parametrize("case", sorted(NEEDS_A_RUN))
def test_the_hint_about_a_run_folder_works(case, cli, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _run_yaml(tmp_path, tiny_model_dir, [_chat(tmp_path)])
    assert cli("run", config, *FAST).code == 0
    _check(cli, *NEEDS_A_RUN[case](tmp_path, tmp_path / "runs" / "tiny"))


def test_the_troubleshooting_table_lists_every_case_and_its_test():
    text = PAGE.read_text(encoding="utf-8")
    table = text[text.index("<!-- errors:start -->"):text.index("<!-- errors:end -->")]
    rows = [row for row in table.splitlines() if row.startswith("| ") and not row.startswith("| message")]
    named = {}
    for row in rows:
        test = re.search(r"`test_hints\.py::(test_\w+)\[([\w-]+)\]`", row)
        assert test, f"row names no test: {row}"
        named[test.group(2)] = test.group(1)
    expected = {**{c: "test_the_hint_works" for c in HINTS},
                **{c: "test_the_hint_about_a_run_folder_works" for c in NEEDS_A_RUN}}
    assert named == expected
