"""The demo corpus: one host chatting with three guests, cut from the `chitchat-dataset` package
(MIT licence; real human chat shipped inside its wheel, so nothing is downloaded)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
from pathlib import Path

from cltune.errors import UserError
from cltune.storage.files import atomic_write_text, writable_folder

HOST = "31267496-e50f-4f91-a197-c5b1bfde803b"
GUESTS = {
    "A": "60576dcf-5b39-4420-a850-33ff7d108047",
    "B": "720840be-e522-47ba-9e9f-143f66372673",
    "C": "95677b7a-44c1-499b-8551-b5ccd870c35a",
}
DEFAULT_SIZES: dict[str, int | None] = {"A": 791, "B": 219, "C": None}  # None: every turn there is


def _corpus_path() -> Path:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or spec.origin is None:
        raise UserError("the demo corpus needs the `chitchat-dataset` package; "
                        "run `pip install chitchat-dataset==0.9.0`")
    return Path(spec.origin).parent / "dataset.json"


def conversation_turns(conversation: dict) -> list[tuple[str, str]]:
    """(sender, text) turns: consecutive messages of one sender joined by a space."""
    turns: list[tuple[str, str]] = []
    for group in conversation["messages"]:
        for message in group:
            text = " ".join(message["text"].split())
            if not text:
                continue
            if turns and turns[-1][0] == message["sender"]:
                turns[-1] = (message["sender"], f"{turns[-1][1]} {text}")
            else:
                turns.append((message["sender"], text))
    return turns


def pair_conversations(corpus: dict, host: str, guest: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(conversation id, turns) of the two-person conversations between host and guest, in a stable order."""
    found = []
    for key in sorted(corpus):
        turns = conversation_turns(corpus[key])
        if turns and {s for s, _ in turns} == {host, guest}:
            found.append((key, turns))
    return found


def sample_turns(conversations: list[tuple[str, list[tuple[str, str]]]], size: int | None,
                 seed: int) -> list[tuple[str, str, str]]:
    """(conversation id, sender, text) of whole conversations in seeded order until `size` turns (the last one cut
    short)."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    turns = [(conversations[i][0], s, t) for i in order for s, t in conversations[i][1]]
    return turns if size is None else turns[:size]


def write_demo_corpus(out_dir: str | Path, sizes: dict[str, int | None] | None = None, seed: int = 0) -> list[Path]:
    """Write `host_guest_<x>.csv` (columns conversation,speaker,text) for each guest; returns the paths."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    corpus = json.loads(_corpus_path().read_text(encoding="utf-8"))
    out_dir = Path(out_dir)
    writable_folder(out_dir, "demo corpus")
    paths = []
    for letter, guest in GUESTS.items():
        turns = sample_turns(pair_conversations(corpus, HOST, guest), sizes[letter], seed)
        names = {HOST: "Host", guest: f"Guest {letter}"}
        path = out_dir / f"host_guest_{letter.lower()}.csv"
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["conversation", "speaker", "text"])
        writer.writerows((c, names[s], t) for c, s, t in turns)
        atomic_write_text(path, text.getvalue())  # two demos at once, or a Ctrl-C, never leave half a file
        paths.append(path)
    return paths
