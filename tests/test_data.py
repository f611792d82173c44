"""Dialogue loading, column detection, speaker tokens, splits, and every bad-input case."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cltune.data import Split, assign_speaker_tokens, build_task, load_dialogue, normalize_speaker, require_no_test
from cltune.data.split import HeldOutLeakError, min_rows, split_counts
from cltune.errors import UserError


def write(tmp_path: Path, text: str | bytes, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.mark.parametrize("header", ["Speaker,Text", "name,utterance", "ROLE,line", "author,content",
                                    " speaker ,message"])
def test_common_column_names_are_detected_case_insensitively(tmp_path, header):
    d = load_dialogue(write(tmp_path, f"{header}\nLex,hello there\nLee,hi\n"))
    assert [(u.speaker, u.text) for u in d.utterances] == [("Lex", "hello there"), ("Lee", "hi")]


def test_explicit_columns_win_over_detection(tmp_path):
    d = load_dialogue(write(tmp_path, "who,said,text\nLex,hello,ignored\n"), speaker_col="WHO", text_col="said")
    assert d.utterances[0].text == "hello" and d.speaker_col == "who"


def test_jsonl_is_read_like_csv(tmp_path):
    d = load_dialogue(write(tmp_path, '{"speaker": "Lex", "text": "hi"}\n\n{"speaker": "Lee", "text": "yo"}\n',
                            "d.jsonl"))
    assert [u.speaker for u in d.utterances] == ["Lex", "Lee"] and d.report.blank_rows == 1


def test_recoverable_problems_are_fixed_and_counted(tmp_path):
    raw = "\ufeffspeaker,text\r\n Lex  Fridman ,  hello  \r\n,\r\nLee,\"two\r\nlines\"\r\n\r\n"
    d = load_dialogue(write(tmp_path, raw))
    assert [(u.speaker, u.text) for u in d.utterances] == [("Lex Fridman", "hello"), ("Lee", "two\r\nlines")]
    r = d.report
    assert (r.bom, r.crlf, r.blank_rows, r.trimmed, r.multiline) == (True, True, 2, 1, 1)
    assert d.utterances[1].line == 4


def test_aliases_and_normalization():
    aliases = {"lex": "Lex Fridman"}
    assert normalize_speaker("  LEX ", aliases) == "Lex Fridman"
    assert normalize_speaker("Lee   Cronin") == "Lee Cronin"


def test_speaker_tokens_use_first_names_and_resolve_collisions_deterministically():
    tokens = assign_speaker_tokens(["Lex Fridman", "Lee Cronin", "Lisa Randall"])
    assert tokens == {"Lex Fridman": "<LEX>", "Lee Cronin": "<LEE>", "Lisa Randall": "<LISA>"}
    guests = assign_speaker_tokens(["Guest B", "Host", "Guest A"])
    assert guests == {"Guest A": "<GUEST_A>", "Guest B": "<GUEST_B>", "Host": "<HOST>"}
    assert assign_speaker_tokens(["Guest A", "Guest B", "Host"]) == guests  # order-independent
    # distinct speakers whose whole names clean to the same slug get numbered suffixes
    assert assign_speaker_tokens(["Sam.", "Sam"]) == {"Sam": "<SAM>", "Sam.": "<SAM_2>"}
    assert assign_speaker_tokens(["Lex Fridman"], {"lex fridman": "<LF>"}) == {"Lex Fridman": "<LF>"}


def test_split_is_deterministic_stratified_and_disjoint(tmp_path):
    rows = "\n".join(f"{'Host' if i % 4 else 'Guest'},line {i}" for i in range(200))
    d = load_dialogue(write(tmp_path, "speaker,text\n" + rows + "\n"))
    tokens = assign_speaker_tokens(d.speakers)
    a = build_task(d, 0, tokens, (0.8, 0.1, 0.1), seed=7)
    b = build_task(d, 0, tokens, (0.8, 0.1, 0.1), seed=7)
    c = build_task(d, 0, tokens, (0.8, 0.1, 0.1), seed=8)
    assert (len(a.train), len(a.val), len(a.test)) == (160, 20, 20)
    assert [e.line for e in a.test] == [e.line for e in b.test] != [e.line for e in c.test]
    lines = [set(e.line for e in part) for part in (a.train, a.val, a.test)]
    assert not (lines[0] & lines[1] or lines[0] & lines[2] or lines[1] & lines[2])
    assert sum(map(len, lines)) == 200
    # stratified: Guest has 50 of 200 rows → 5 of the 20 test rows
    assert sum(e.speaker == "Guest" for e in a.test) == 5


def test_split_counts_and_minimum():
    assert split_counts(791, (0.8, 0.1, 0.1)) == (633, 79, 79)
    assert min_rows((0.8, 0.1, 0.1)) == 5


def test_test_split_guard_refuses_test_examples(tmp_path):
    d = load_dialogue(write(tmp_path, "speaker,text\n" + "\n".join(f"A,x{i}" for i in range(20)) + "\n"))
    task = build_task(d, 0, {"A": "<A>"}, (0.8, 0.1, 0.1), 0)
    assert require_no_test(task.train + task.val, "training")
    with pytest.raises(HeldOutLeakError, match="reached training"):
        require_no_test(task.train + task.test[:1], "training")
    assert all(e.split is Split.TEST for e in task.test)


BAD_INPUTS = [
    ("missing", None, "file not found"),
    ("empty", b"", "file is empty"),
    ("blank", b"\n\n  \n", "file is empty"),
    ("no header", b"Lex,hello\nLee,hi\n", "no speaker column"),
    ("missing column", b"speaker,words\nLex,hello\n", "no text column"),
    ("ambiguous", b"speaker,name,text\nLex,Lex,hi\n", "could each be the speaker column"),
    ("duplicate", b"speaker,text,Text\nLex,a,b\n", "duplicate column"),
    ("not utf-8", b"speaker,text\nLex,caf\xe9\n", "line 2: byte 0xe9 at offset 20 is not UTF-8"),
    ("empty text", b"speaker,text\nLex,hi\nLee,   \n", "line 3: missing text"),
    ("nan text", b"speaker,text\nLex,hi\nLee,NaN\n", "line 3: missing text"),
    ("empty speaker", b"speaker,text\n,hi\n", "line 2: empty speaker"),
    ("header only", b"speaker,text\n", "no utterance rows"),
]


@pytest.mark.parametrize("case,raw,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_one_line_user_error(tmp_path, case, raw, message):
    path = tmp_path / "bad.csv" if raw is None else write(tmp_path, raw, "bad.csv")
    with pytest.raises(UserError) as err:
        load_dialogue(path)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_too_few_rows_for_a_split(tmp_path):
    d = load_dialogue(write(tmp_path, "speaker,text\nA,one\nA,two\nA,three\n"))
    with pytest.raises(UserError, match=r"3 utterance rows are too few for a 80/10/10 split \(needs at least 5\)"):
        build_task(d, 0, {"A": "<A>"}, (0.8, 0.1, 0.1), 0)


def test_drop_missing_counts_instead_of_failing(tmp_path):
    d = load_dialogue(write(tmp_path, "speaker,text\nLex,hi\nLee,\nLee,nan\n"), drop_missing=True)
    assert len(d.utterances) == 1 and d.report.missing_dropped == 2


@pytest.mark.parametrize("raw,message", [(b"speaker,text\nLex,caf\xe9\n", "not UTF-8"), (b"", "file is empty")])
def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, raw, message):
    path = write(tmp_path, raw, "bad.csv")
    out = tmp_path / "eda-out"
    proc = subprocess.run([sys.executable, "-m", "cltune", "eda", str(path), "--out", str(out), "--whitespace"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def _conversations(tmp_path: Path, column: str = "conversation_id", counts=(3, 8, 2, 5, 12, 4, 6, 9, 1, 7)) -> Path:
    rows = [f"c{i},{'Host' if j % 2 == 0 else 'Guest'},turn {j} of conversation {i}"
            for i, n in enumerate(counts) for j in range(n)]
    return write(tmp_path, f"{column},speaker,text\n" + "\n".join(rows) + "\n")


@pytest.mark.parametrize("column", ["conversation_id", "Session", "episode", "dialogue"])
def test_a_conversation_column_is_detected(tmp_path, column):
    data = load_dialogue(_conversations(tmp_path, column))
    assert data.conversation_col == column and data.conversations == [f"c{i}" for i in range(10)]
    assert load_dialogue(_conversations(tmp_path, column), conversation_col="none").conversations is None


def test_splits_keep_each_conversation_whole_and_near_their_share(tmp_path):
    data = load_dialogue(_conversations(tmp_path))
    conversation_of = {u.line: u.conversation for u in data.utterances}
    for seed in range(5):
        task = build_task(data, 0, {"Host": "<H>", "Guest": "<G>"}, (0.8, 0.1, 0.1), seed)
        owners = [{conversation_of[e.line] for e in part} for part in (task.train, task.val, task.test)]
        assert all(owners) and not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
        assert sum(map(len, owners)) == 10 and len(task.train) + len(task.val) + len(task.test) == 57
        assert 2 <= len(task.test) <= 12 and 2 <= len(task.val) <= 12  # share 5.7 each, whole conversations
    again = build_task(data, 0, {"Host": "<H>", "Guest": "<G>"}, (0.8, 0.1, 0.1), 0)
    assert again == build_task(data, 0, {"Host": "<H>", "Guest": "<G>"}, (0.8, 0.1, 0.1), 0)


def test_conversation_problems_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="line 3: empty conversation id in column 'session'"):
        load_dialogue(write(tmp_path, "session,speaker,text\nc1,Host,hi\n,Guest,hello\n"))
    with pytest.raises(UserError, match="'session', 'episode'.* could each be the conversation column"):
        load_dialogue(write(tmp_path, "session,episode,speaker,text\nc1,e1,Host,hi\n"))
    two = load_dialogue(_conversations(tmp_path, counts=(20, 20)))
    with pytest.raises(UserError, match="2 conversation.* too few for a 80/10/10 split by conversation"):
        build_task(two, 0, {"Host": "<H>", "Guest": "<G>"}, (0.8, 0.1, 0.1), 0)


def test_a_bad_byte_after_a_character_split_across_read_chunks_is_found_exactly(tmp_path):
    """Files are decoded a megabyte at a time: a two-byte letter across the boundary is no error, and the
    first bad byte after it is named by its line and its offset in the whole file."""
    head = b"speaker,text\n" + (b"Host," + b"a" * 94 + b"\n") * 10_400
    head += b"Host," + b"a" * ((1 << 20) - 1 - len(head) - 5)  # 'é' starts on the first chunk's last byte
    raw = head + "é".encode() + b"\nGuest,ok\nHost,bad \xff byte\n"
    path = tmp_path / "chunks.csv"
    path.write_bytes(raw)
    bad = raw.index(b"\xff")
    assert raw[(1 << 20) - 1 : (1 << 20) + 1] == "é".encode() and raw[:bad].count(b"\n") + 1 == 10_404
    with pytest.raises(UserError, match=f"line 10404: byte 0xff at offset {bad} is not UTF-8"):
        load_dialogue(path)
    path.write_bytes(raw.replace(b"\xff", b"!"))
    assert load_dialogue(path).utterances[10_400].text.endswith("aé")


def test_crlf_line_ends_after_the_first_4_kb_are_still_seen(tmp_path):
    """The reader looks for CRLF in the first megabyte (its read buffer), not in the first 4 KB only."""
    path = tmp_path / "late.csv"
    path.write_bytes(b"speaker,text\n" + b"Host,hi there\n" * 400 + b"Guest,bye\r\n")
    assert load_dialogue(path).report.crlf
