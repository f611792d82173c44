"""Fuzz cltune's input edge: generated CSV/JSONL bytes, column layouts and run configs must each
give a valid dataset/config or a `UserError` with a one-line message, never a traceback.

    python bench/fuzz.py --cases 10000        # prints the case count and the outcome breakdown

The generators and the oracle live here; tests/test_fuzz.py runs a small sample of the same
cases under pytest. Exit status 1 when any case crashed (its input is printed to reproduce it).
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cltune.api import make_config, read_config
from cltune.config import dump_config
from cltune.data import assign_speaker_tokens, build_task, load_dialogue
from cltune.data.split import Split
from cltune.errors import UserError

HEADERS = ["speaker", "text", "Speaker ", " TEXT", "name", "utterance", "role", "content", "message", "line", "author",
           "", "id", "a,b", 'q"uote', "multi\nline", "spéaker", "text\x00"]
CELLS = ["", " ", "nan", "NULL", "N/A", "none", "hello there", "  padded  ", "multi\nline", 'say "hi"', "a,b", "\t",
         "\x00", "ü", "😀", "\u2028", "\u200b", "Host", "Guest A", "guest  a", "\r", "x" * 300]
WORDS = "so tell me what you think about pizza music quantum fields".split()
SPEAKERS = ["Host", "Guest A", "Guest B", "guest  a", " Host ", "Dr. Émile Zola", "<B>", "X Æ A-12"]
PLAUSIBLE = st.one_of(st.integers(0, 64), st.floats(0, 2), st.booleans(),
                      st.sampled_from(["linear", "cosine", "fp32", "auto", "naive", "replay", "ewc", "ewc_replay",
                                       "x"]))
HOSTILE = st.one_of(st.none(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["", "../../x", "lambda", "nan", "1e999"]))
SCALARS = PLAUSIBLE | HOSTILE
VALUES = st.recursive(SCALARS, lambda inner: (st.lists(inner, max_size=3)
                                              | st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
KEYS = ["name", "seed", "output_dir", "strategy", "model.name", "model.precision", "model.trust_remote_code", "lora.r",
        "lora.alpha", "lora.dropout", "lora.target_modules", "data.split", "data.max_length", "data.aliases",
        "data.speaker_tokens", "data.drop_missing", "data.speaker_col", "train.epochs", "train.lr", "train.batch_size",
        "train.micro_batch_size", "train.max_steps", "train.schedule",
        "train.checkpoint_every", "train.save_total_limit",
        "train.warmup_ratio", "phase1.epochs", "phase2.lr", "phase0.lr", "phase1", "phases", "tasks", "tasks.0",
        "tasks.0.path", "tasks.0.name", "tasks.3.path", "eval.batch_size", "ewc.lambda", "replay.ratio", "bogus",
        "train.bogus", ".", "a..b", "tasks.x"]
RAW_OVERRIDES = ["[", "{a: 1", "!!python/object/apply:os.system ['true']", "1e999", "~", "null", "'x'", "- a\n- b",
                 "\"unterminated", "{{}}", "&a [*a]", ":", "@", "%", "`"]


@st.composite
def dialogue_rows(draw) -> tuple[list[str], list[list[str]]]:
    """A mostly well-formed table: speaker and text columns (any known name, any order, extra
    columns), 0-30 rows, with a few hostile cells, short rows or long rows mixed in."""
    speaker, text = draw(st.sampled_from(["speaker", "Speaker", "name", "role", " author "])), \
        draw(st.sampled_from(["text", "utterance", "line", "content", "Message"]))
    headers = draw(st.permutations([speaker, text, *draw(st.lists(st.sampled_from(["id", "notes", ""]), max_size=2,
                                                                     unique=True))]))
    rows = []
    for _ in range(draw(st.integers(0, 30))):
        row = {speaker: draw(st.sampled_from(SPEAKERS)),
               text: " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6)))}
        cells = [row.get(h, "") for h in headers]
        if draw(st.integers(0, 29)) == 29:  # one row in 30 is damaged (0, hypothesis's simplest draw, is a clean row)
            cells[draw(st.integers(0, len(cells) - 1))] = draw(st.sampled_from(CELLS) | st.text(max_size=8))
            cells = cells[: draw(st.integers(0, len(cells) + 1))] + [""] * draw(st.integers(0, 1))
        rows.append(cells)
    return headers, rows


@st.composite
def csv_bytes(draw) -> bytes:
    """A CSV with plausible or hostile headers and cells, varied quoting and line endings, stray bytes."""
    if draw(st.integers(0, 3)) < 3:  # mostly plausible tables; 0 is hypothesis's simplest draw
        headers, rows = draw(dialogue_rows())
    else:
        headers = draw(st.lists(st.sampled_from(HEADERS) | st.text(max_size=8), min_size=0, max_size=4))
        rows = draw(st.lists(st.lists(st.sampled_from(CELLS) | st.text(max_size=15), max_size=5), max_size=8))
    buffer = io.StringIO()
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, None]))
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    for row in [headers, *rows]:
        if quoting is None:  # hand-joined: unbalanced quotes and stray commas reach the parser as written
            buffer.write(",".join(row) + ending)
        else:
            csv.writer(buffer, quoting=quoting, lineterminator=ending).writerow(row)
    data = buffer.getvalue().encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # a stray byte: invalid UTF-8, NUL, a quote
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\x00", b'"', b"\xc3", b"\n", b","])) + data[at:]
    return data


@st.composite
def jsonl_bytes(draw) -> bytes:
    headers, rows = draw(dialogue_rows())
    plausible = [json.dumps(dict(zip(headers, r))) for r in rows]
    obj = st.dictionaries(st.sampled_from(["speaker", "text", "name", "utterance", "Speaker", "x"])
                          | st.text(max_size=5),
                          VALUES, max_size=4)
    hostile = st.one_of(obj.map(json.dumps), VALUES.map(json.dumps), st.text(max_size=20),
                        st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
                        st.integers(4000, 6000).map(lambda n: "1" * n), st.just(""))
    for _ in range(draw(st.sampled_from([0, 0, 1, 3]))):
        plausible.insert(draw(st.integers(0, len(plausible))), draw(hostile))
    return "\n".join(plausible).encode("utf-8", "surrogatepass")


LOAD_OPTIONS = st.fixed_dictionaries({
    "speaker_col": st.sampled_from([None] * 60 + ["speaker", "name", "role"] + HEADERS),
    "text_col": st.sampled_from([None] * 60 + ["text", "utterance"] + HEADERS),
    "aliases": st.none() | st.dictionaries(st.sampled_from(SPEAKERS + CELLS) | st.text(max_size=6), st.text(max_size=6),
                                           max_size=2),
    "drop_missing": st.booleans(),
})
SPLITS = st.sampled_from([(0.8, 0.1, 0.1), (0.5, 0.25, 0.25), (0.98, 0.01, 0.01), (1 / 3, 1 / 3, 1 / 3)])
FILES = st.one_of(st.tuples(st.sampled_from([".csv", ".csv", ".CSV", ".txt", ".jsonl"]), csv_bytes()),
                  st.tuples(st.sampled_from([".jsonl", ".jsonl", ".ndjson", ".csv"]), jsonl_bytes()),
                  st.tuples(st.sampled_from([".csv", ".jsonl"]), st.binary(max_size=200)))
DATASET_CASES = st.tuples(FILES, LOAD_OPTIONS, SPLITS,
                          st.none() | st.dictionaries(st.sampled_from(SPEAKERS), st.text(max_size=8), max_size=2))
CONFIG_CASES = st.tuples(st.dictionaries(st.sampled_from(KEYS), PLAUSIBLE | VALUES, max_size=2),
                         st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=10),
                                            PLAUSIBLE.map(str) | st.sampled_from(RAW_OVERRIDES) | SCALARS.map(str)),
                                  max_size=2),
                         st.booleans())


def check_message(err: UserError) -> str:
    """A UserError is one non-empty line; returns a short category for the breakdown."""
    message = str(err)
    assert message.strip(), "empty UserError message"
    assert "\n" not in message and "\r" not in message, f"multi-line UserError: {message!r}"
    words = re.sub(r"\d+", "N", re.sub(r"^.*?: (line \d+: )?", "", message))
    return " ".join(words.split()[:3])


def check_dataset_case(case, folder: Path) -> str:
    """Load generated bytes as a dialogue file; then speaker tokens and a split, as `cltune run` does."""
    (suffix, data), options, fractions, token_overrides = case
    path = folder / f"case{suffix}"
    path.write_bytes(data)
    try:
        dataset = load_dialogue(path, **options)
    except UserError as err:
        return "load: " + check_message(err)
    for u in dataset.utterances:
        assert u.speaker and u.text and u.text == u.text.strip() and u.line >= 1, u
    try:
        tokens = assign_speaker_tokens(dataset.speakers, token_overrides)
        task = build_task(dataset, 0, tokens, fractions, seed=0)
    except UserError as err:
        return "split: " + check_message(err)
    parts = [task.train, task.val, task.test]
    assert sum(map(len, parts)) == len(dataset.utterances) and all(parts), "split lost or duplicated rows"
    assert {e.split for e in task.test} == {Split.TEST}
    if not token_overrides:
        assert len(set(tokens.values())) == len(tokens) and all(re.fullmatch(r"<[A-Z0-9_]+>", t)
                                                                for t in tokens.values())
    return "valid dataset"


def _base_config(folder: Path) -> dict:
    csv_path = folder / "ok.csv"
    if not csv_path.exists():
        csv_path.write_text("speaker,text\n" + "".join(f"{'Host' if i % 2 else 'Guest'},line {i}\n" for i in range(20)))
    return {"name": "fuzz", "output_dir": str(folder / "runs"), "strategy": "naive", "tasks": [{"path": str(csv_path)}]}


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        nxt = tree.get(key)
        if not isinstance(nxt, dict):
            nxt = tree[key] = {}
        tree = nxt
    tree[keys[-1]] = value


def check_config_case(case, folder: Path) -> str:
    """Build a config from a mutated dict and --set strings (or YAML text): a config or a one-line UserError."""
    mutations, overrides, via_file = case
    raw = _base_config(folder)
    for key, value in mutations.items():
        _set(raw, key, value)
    sets = [f"{k}={v}" for k, v in overrides]
    try:
        if via_file:
            path = folder / "run.yaml"
            path.write_bytes(yaml.safe_dump(raw, allow_unicode=True).encode("utf-8", "surrogatepass"))
            config = read_config(path, sets)
        else:
            config = make_config(raw, sets)
    except UserError as err:
        return "config: " + check_message(err)
    for k in range(len(config.tasks) + 1):
        config.phase(k)
    again = make_config(yaml.safe_load(dump_config(config)))  # the resolved YAML must rebuild the same config
    assert again.model_dump() == config.model_dump(), "config.resolved.yaml does not round-trip"
    return "valid config"


def _short(case, limit: int = 400) -> str:
    text = repr(case)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def run_cases(cases: int, seed: int | None = None, show: int = 3) -> collections.Counter:
    """Run at least `cases` generated cases (datasets and configs alternate); count their outcomes."""
    outcomes: collections.Counter = collections.Counter()
    crashes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        def record(kind: str, check, case) -> None:
            try:
                outcomes[check(case, folder)] += 1
            except Exception as err:  # noqa: BLE001 - every other exception is the bug being hunted
                outcomes[f"CRASH ({kind}): {type(err).__name__}"] += 1
                if len(crashes) < show:
                    crashes.append(f"{kind} case {_short(case)}\n{traceback.format_exc(limit=-3)}")

        config = settings(max_examples=cases // 2 + 1, database=None, deadline=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))

        @config
        @given(DATASET_CASES)
        def datasets(case):
            record("dataset", check_dataset_case, case)

        @config
        @given(CONFIG_CASES)
        def configs(case):
            record("config", check_config_case, case)

        rounds = 0
        while sum(outcomes.values()) < cases and rounds < 20:
            if seed is not None:
                datasets._hypothesis_internal_use_seed = configs._hypothesis_internal_use_seed = seed + rounds
            datasets()
            configs()
            rounds += 1
    for text in crashes:
        print(text, file=sys.stderr)
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="generated cases to run (at least)")
    parser.add_argument("--seed", type=int, default=None, help="fix hypothesis's seed to repeat a run")
    args = parser.parse_args()
    start = time.perf_counter()
    outcomes = run_cases(args.cases, args.seed)
    total = sum(outcomes.values())
    print(f"{total} cases in {time.perf_counter() - start:.1f} s")
    for outcome, count in outcomes.most_common():
        print(f"{count:7d}  {outcome}")
    crashed = sum(n for o, n in outcomes.items() if o.startswith("CRASH"))
    print(f"{crashed} crashes (tracebacks); {total - crashed} valid inputs or one-line UserErrors")
    sys.exit(1 if crashed else 0)


if __name__ == "__main__":
    main()
