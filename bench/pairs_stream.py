"""A 3-dataset stream whose speakers differ, cut from the demo corpus (`chitchat-dataset`), and its config.

Issue 33's second goal stream: two pairs of people who share no one (pair 1: P and Q, pair 2: R and S), then a
pair that shares a speaker with the first (pair 3: P and T) — no host runs through every file, unlike the demo and
the podcast. The pairs are the corpus's two-person pairs with the most turns, the demo host left out; each file
holds the opening turns of at least 8 of the pair's conversations, 400 turns in all (as `cltune demo-data` cuts
the podcast's later guests). Writes pair_1.csv … pair_3.csv and pairs.yaml (the podcast config's budget: one epoch
a phase) into OUT and prints who is who.

    .venv/bin/python bench/pairs_stream.py OUT
    cltune compare OUT/pairs.yaml --strategies progressive --seeds 3
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TURNS, CONVERSATIONS = 400, 8


def main() -> None:
    from cltune.data.demo import HOST, _corpus_path, conversation_turns, pair_conversations, sample_turns
    from cltune.storage.files import atomic_write_text

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    corpus = json.loads(_corpus_path().read_text(encoding="utf-8"))
    turns: dict[frozenset, int] = {}
    for key in corpus:
        found = conversation_turns(corpus[key])
        people = frozenset(s for s, _ in found)
        if len(people) == 2 and HOST not in people:
            turns[people] = turns.get(people, 0) + len(found)
    ranked = sorted(turns, key=lambda pair: (-turns[pair], sorted(pair)))
    first = ranked[0]
    second = next(pair for pair in ranked if not pair & first)
    third = next(pair for pair in ranked if len(pair & first) == 1 and not pair & second)
    shared = next(iter(third & first))
    people = {shared: "Person 1", next(iter(first - {shared})): "Person 2"}
    people.update(zip(sorted(second), ("Person 3", "Person 4")))
    people[next(iter(third - {shared}))] = "Person 5"
    tasks = []
    for index, pair in enumerate((first, second, third), start=1):
        a, b = sorted(pair)
        chosen = sample_turns(pair_conversations(corpus, a, b), TURNS, seed=0, per_conversation=TURNS // CONVERSATIONS)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["conversation", "speaker", "text"])
        writer.writerows((c, people[s], t) for c, s, t in chosen)
        path = out / f"pair_{index}.csv"
        atomic_write_text(path, text.getvalue())
        tasks.append(f"  - {{name: pair_{index}, path: {path.name}}}")
        print(f"pair_{index}: {' and '.join(sorted(people[p] for p in pair))} ({turns[pair]} turns in the corpus, "
              f"{len(chosen)} written)")
    atomic_write_text(out / "pairs.yaml", "\n".join([
        "# bench/pairs_stream.py: two pairs who share no one, then a pair sharing Person 1 with the first",
        "name: pairs", "seed: 0", "model:", "  name: smollm2-135m-instruct", "tasks:", *tasks,
        "train:", "  epochs: 1", "  lr: 2.0e-4", "  schedule: linear", "  warmup_ratio: 0.1",
        "eval:", "  attribution: false", "  samples_per_speaker: 0", ""]))
    print(f"config: {out / 'pairs.yaml'}")


if __name__ == "__main__":
    main()
