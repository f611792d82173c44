"""EDA numbers on a small hand-made CSV."""

from __future__ import annotations

import json
import statistics
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from cltune.data import load_dialogue
from cltune.data.eda import _stats, summarize, write_eda


def test_eda_numbers_on_a_hand_made_csv(tmp_path):
    path = tmp_path / "talk.csv"
    path.write_text("speaker,text\nLex,hello world\nLee,hi\nLex,hello again my friend\nLex,ok\n\n", encoding="utf-8")
    s = summarize(load_dialogue(path), max_len=2)
    assert s["utterances"] == 4
    assert s["per_speaker"] == {"Lex": 3, "Lee": 1}
    assert s["speaker_share"] == {"Lex": 0.75, "Lee": 0.25}
    assert s["dominant_speakers"] == ["Lex"]  # 75% > 60%
    assert s["chars"]["min"] == 2 and s["chars"]["max"] == len("hello again my friend")
    assert s["tokens"]["max"] == 4 and s["tokens"]["share_within_max_len"] == 0.75  # whitespace fallback
    assert s["vocabulary"] == {"Lex": 6, "Lee": 1}  # hello world again my friend ok
    assert s["missing"]["blank_rows"] == 1
    assert [u["text"] for u in s["shortest"][:2]] == ["hi", "ok"]
    assert s["longest"][0]["text"] == "hello again my friend"


def test_write_eda_files(tmp_path):
    path = tmp_path / "talk.csv"
    path.write_text("speaker,text\nA,one two\nB,three\n", encoding="utf-8")
    summary = write_eda([summarize(load_dialogue(path))], tmp_path / "out", "whitespace words", 100)
    assert (tmp_path / "out" / "talk_lengths.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "eda.json").read_text())["datasets"][0]["utterances"] == 2
    assert "| talk | 2 | 2 |" in (tmp_path / "out" / "eda.md").read_text()
    assert summary["tokenizer"] == "whitespace words"


@given(st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=200),
       st.integers(min_value=0, max_value=60))
def test_length_statistics_from_counts_equal_those_of_the_values(values, max_len):
    """EDA keeps {length: utterances}, not one number per utterance: its statistics must not change."""
    assert _stats(Counter(values), max_len) == {
        "min": min(values), "mean": round(statistics.fmean(values), 2), "median": statistics.median(values),
        "p90": sorted(values)[min(len(values) - 1, int(0.9 * len(values)))], "max": max(values),
        "share_within_max_len": round(sum(v <= max_len for v in values) / len(values), 4)}
