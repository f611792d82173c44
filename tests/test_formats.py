"""Input formats beyond speaker/text CSV: chat-format JSONL (one conversation per line) and Parquet —
read into the same utterances, conversations and errors, and run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cltune.data import load_dialogue
from cltune.errors import UserError

from helpers import PPL_ONLY, tiny_run_config, write_dialogue


def chat_jsonl(path: Path, conversations: list[list[tuple[str, str]]], *, ids: bool = False) -> Path:
    """One line per conversation; the host speaks as `role: user` with a name, the guest as `role: assistant`."""
    with path.open("w", encoding="utf-8") as fh:
        for n, turns in enumerate(conversations):
            messages = [{"role": "user", "name": s, "content": t} if s == "Host" else
                        {"role": "assistant", "name": s, "content": [{"type": "text", "text": t}]} for s, t in turns]
            fh.write(json.dumps({**({"id": f"talk-{n}"} if ids else {}), "messages": messages, "source": "x"}) + "\n")
    return path


def _talks(guest: str, count: int) -> list[list[tuple[str, str]]]:
    return [[("Host", f"so tell me {i}"), (guest, f"i love pizza {i}"), ("Host", "what do you think")]
            for i in range(count)]


def test_chat_format_lines_are_conversations_of_named_messages(tmp_path):
    path = chat_jsonl(tmp_path / "a.jsonl", _talks("Guest A", 3), ids=True)
    dataset = load_dialogue(path)
    assert [(u.speaker, u.text, u.line, u.conversation) for u in dataset.utterances[:4]] == [
        ("Host", "so tell me 0", 1, "talk-0"), ("Guest A", "i love pizza 0", 1, "talk-0"),
        ("Host", "what do you think", 1, "talk-0"), ("Host", "so tell me 1", 2, "talk-1")]
    assert dataset.conversations == ["talk-0", "talk-1", "talk-2"] and dataset.speakers == ["Host", "Guest A"]
    # without an id key, each line is its own conversation; a message without a name is its role
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hi"}]}) + "\n\n" +
                    json.dumps({"messages": [{"role": "user", "content": "again"}]}) + "\n")
    dataset = load_dialogue(path)
    assert [(u.speaker, u.text, u.conversation) for u in dataset.utterances] == [
        ("system", "be brief", "line 1"), ("user", "hi", "line 1"), ("user", "again", "line 3")]


@pytest.mark.parametrize(("line", "message"), [
    ('{"messages": "hi"}', r"a.jsonl: line 2: no `messages` list; each line must be"),
    ('{"messages": [{"content": "hi"}]}', r"a.jsonl: line 2: message 1 has no `name` or `role`"),
    ('{"messages": [{"role": "user", "content": 5}]}', r"a.jsonl: line 2: message 1: `content` is int, not text"),
    ('{"messages": [{"role": "user", "content": ""}]}', r"a.jsonl: line 2: missing text in column 'content'"),
    ('{"messages": [3]}', r"a.jsonl: line 2: message 1 is not an object"),
    ('{"messages": [', r"a.jsonl: line 2: invalid JSON"),
])
def test_bad_chat_lines_are_one_line_errors(tmp_path, line, message):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "fine"}]}) + "\n" + line + "\n")
    with pytest.raises(UserError, match=message) as err:
        load_dialogue(path)
    assert "\n" not in str(err.value)


def test_parquet_reads_like_the_csv_it_was_made_from(tmp_path):
    import pandas as pd

    csv_path = write_dialogue(tmp_path / "a.csv", "Guest A", 20, 3)
    frame = pd.read_csv(csv_path)
    frame.insert(0, "conversation", [f"c{i // 4}" for i in range(len(frame))])
    frame.to_parquet(tmp_path / "a.parquet", row_group_size=7)  # several row groups
    frame.to_csv(csv_path, index=False)
    from_parquet, from_csv = load_dialogue(tmp_path / "a.parquet"), load_dialogue(csv_path)
    assert [(u.speaker, u.text, u.conversation) for u in from_parquet.utterances] == \
        [(u.speaker, u.text, u.conversation) for u in from_csv.utterances]
    assert [u.line for u in from_parquet.utterances] == list(range(1, 21))  # rows, numbered from 1

    frame.loc[4, "text"] = None
    frame.to_parquet(tmp_path / "b.parquet")
    with pytest.raises(UserError, match=r"b.parquet: row 5: missing text in column 'text'"):
        load_dialogue(tmp_path / "b.parquet")
    frame.rename(columns={"speaker": "who"}).to_parquet(tmp_path / "c.parquet")
    with pytest.raises(UserError,
                       match=r"c.parquet: columns: no speaker column found among \(conversation, who, text\)"):
        load_dialogue(tmp_path / "c.parquet")
    (tmp_path / "d.parquet").write_text("speaker,text\nHost,hi\n")
    with pytest.raises(UserError, match=r"d.parquet: not a readable Parquet file"):
        load_dialogue(tmp_path / "d.parquet")


def test_a_chat_format_stream_runs_end_to_end(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`cltune run` on two chat-format JSONL files: splits by conversation, context turns inside them."""
    import yaml

    from helpers import run_cli

    files = [chat_jsonl(tmp_path / "guest_a.jsonl", _talks("Guest A", 12)),
             chat_jsonl(tmp_path / "guest_b.jsonl", _talks("Guest B", 9))]
    raw = tiny_run_config(tiny_model_dir, files, tmp_path / "runs", "ewc_replay")
    raw["data"] = {"max_length": 32, "context_turns": 2}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = run_cli(monkeypatch, capsys, "run", config, *[a for s in PPL_ONLY for a in ("--set", s)])
    assert result.code == 0, result.err
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert metrics["tasks"] == ["guest_a", "guest_b"] and metrics["context_turns"] == 2
    assert metrics["speaker_tokens"] == {"Host": "<HOST>", "Guest A": "<GUEST_A>", "Guest B": "<GUEST_B>"}
    # whole conversations (3 utterances each) per split
    assert all(sizes[split] % 3 == 0 for sizes in metrics["split_sizes"] for split in ("train", "val", "test"))
    assert metrics["ppl"][1][0] < metrics["ppl"][0][0]
    eda = run_cli(monkeypatch, capsys, "eda", *files, "--out", tmp_path / "eda", "--whitespace")
    assert eda.code == 0 and "guest_a" in eda.out
    summary = json.loads((tmp_path / "eda" / "eda.json").read_text())["datasets"]
    assert [(d["utterances"], d["per_speaker"]) for d in summary] == [(36, {"Host": 24, "Guest A": 12}),
                                                                      (27, {"Host": 18, "Guest B": 9})]
