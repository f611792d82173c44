"""The demo corpus: one host chatting with three guests (or more), cut from the `chitchat-dataset` package
(MIT licence; real human chat shipped inside its wheel, so nothing is downloaded).

Guests A, B and C are fixed partners of the host; `guests` > 3 adds the host's other partners in
order of how many turns they share with the host (Guest D has the most), up to `EXTRA_TURNS` turns each
by default (the opening turns of `CONVERSATIONS` or more of their conversations), so a podcast-like
stream of a host and many guests trains in minutes per phase."""

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
EXTRA_TURNS = 400  # turns of each guest after C (`cltune demo-data --guests N`)
CONVERSATIONS = 8  # conversations (at least) those turns come from
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


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
                 seed: int, per_conversation: int | None = None) -> list[tuple[str, str, str]]:
    """(conversation id, sender, text) of whole conversations (or their first `per_conversation` turns) in seeded
    order until `size` turns (the last one cut short)."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    turns = [(conversations[i][0], s, t) for i in order for s, t in conversations[i][1][:per_conversation]]
    return turns if size is None else turns[:size]


def host_partners(corpus: dict, host: str = HOST) -> list[tuple[str, int]]:
    """(partner, turns in their two-person conversations with `host`), most turns first (ties by id)."""
    turns: dict[str, int] = {}
    for key in corpus:
        found = conversation_turns(corpus[key])
        senders = {s for s, _ in found}
        if host in senders and len(senders) == 2:
            partner = (senders - {host}).pop()
            turns[partner] = turns.get(partner, 0) + len(found)
    return sorted(turns.items(), key=lambda item: (-item[1], item[0]))


def demo_guests(corpus: dict, count: int) -> dict[str, str]:
    """Letter → sender id of the first `count` guests: A, B, C, then the host's other partners by turns."""
    if not 1 <= count <= len(LETTERS):
        raise UserError(f"--guests {count}: the demo corpus writes 1 to {len(LETTERS)} guests")
    ids = list(GUESTS.values())[:count]
    if count > len(ids):  # ranking the host's partners reads every conversation: only when more are asked for
        ids += [partner for partner, _ in host_partners(corpus) if partner not in GUESTS.values()][: count - len(ids)]
    if len(ids) < count:
        raise UserError(f"--guests {count}: the host has {len(ids)} partners in the corpus; ask for at most that many")
    return dict(zip(LETTERS, ids))


def guest_count(names: list[str]) -> int:
    """How many demo guests a config reads: the last letter among task files named `host_guest_<x>.csv` (3 at least,
    the demo's own)."""
    letters = [Path(n).stem[len("host_guest_"):].upper() for n in names if Path(n).stem.startswith("host_guest_")]
    return max([3] + [LETTERS.index(x) + 1 for x in letters if len(x) == 1 and x in LETTERS])


def write_demo_corpus(out_dir: str | Path, sizes: dict[str, int | None] | None = None, seed: int = 0,
                      guests: int = 3) -> list[Path]:
    """Write `host_guest_<x>.csv` (columns conversation,speaker,text) for each of `guests` guests; returns the paths."""
    corpus = json.loads(_corpus_path().read_text(encoding="utf-8"))
    chosen = demo_guests(corpus, guests)
    sizes = {**{letter: EXTRA_TURNS for letter in chosen}, **DEFAULT_SIZES, **(sizes or {})}
    out_dir = Path(out_dir)
    writable_folder(out_dir, "demo corpus")
    paths = []
    for letter, guest in chosen.items():
        # Guests after C: the opening turns of at least CONVERSATIONS conversations (some of theirs run to 500 turns,
        # and a split by conversation needs several)
        cap = None if letter in GUESTS or sizes[letter] is None else max(1, sizes[letter] // CONVERSATIONS)
        turns = sample_turns(pair_conversations(corpus, HOST, guest), sizes[letter], seed, cap)
        names = {HOST: "Host", guest: f"Guest {letter}"}
        path = out_dir / f"host_guest_{letter.lower()}.csv"
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["conversation", "speaker", "text"])
        writer.writerows((c, names[s], t) for c, s, t in turns)
        atomic_write_text(path, text.getvalue())  # two demos at once, or a Ctrl-C, never leave half a file
        paths.append(path)
    return paths
