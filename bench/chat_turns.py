"""Chat turn cost with and without the conversation's key/value cache, turn by turn.

A scripted chat: the user's lines are the host's turns of the longest conversation in a dialogue file
(the demo's guest B by default), answered greedily by the guest, so both sides produce the same replies
(printed). Each round runs the whole script once without the cache and once with it, alternating which
goes first; the table gives the median seconds of each turn, the prompt's length and how many of its
tokens the cache served. Needs a checkpoint trained with `data.context_turns: all`, for instance:

    .venv/bin/cltune run src/cltune/configs/demo.yaml --set data.context_turns=all --set data.max_length=512
    .venv/bin/python bench/chat_turns.py --checkpoint checkpoints/demo/phase2 --turns 20 --rounds 3
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import describe_machine, machine_line  # noqa: E402


def host_lines(path: Path, user: str, turns: int) -> list[str]:
    """The first `turns` lines of `user` in the conversation of `path` where `user` speaks most."""
    by_conversation: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["speaker"] == user:
                by_conversation.setdefault(row["conversation"], []).append(row["text"])
    longest = max(by_conversation.values(), key=len)
    if len(longest) < turns:
        raise SystemExit(f"{path}: the longest conversation has {len(longest)} turns of {user}, fewer than {turns}")
    return longest[:turns]


def one_chat(talker, lines: list[str], voice: str, user: str, max_new_tokens: int) -> list[dict]:
    """Per turn: seconds of the reply, prompt tokens, tokens served from the cache, the reply."""
    from rich.console import Console

    from cltune.serving.chat import Sampling, chat

    talker.caches.clear()
    rows: list[dict] = []
    reply = talker.reply

    def timed(history, token, text="", sampling=Sampling(), emit=None):
        ids, _ = talker.prompt(history, token, text, reply_budget=sampling.max_new_tokens)
        start = time.perf_counter()
        out = reply(history, token, text, sampling, emit)
        cache = talker.caches.get(token)
        rows.append({"seconds": time.perf_counter() - start, "prompt": len(ids),
                     "reused": cache.reused if cache is not None else 0, "reply": out})
        return out

    talker.reply = timed
    try:
        chat(talker, voice, user, lines, Console(file=io.StringIO()),
             sampling=Sampling(max_new_tokens=max_new_tokens, temperature=0))
    finally:
        talker.reply = reply
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a phase folder trained with context_turns: all")
    parser.add_argument("--data", type=Path, 
                        help="a dialogue file with a conversation column (default: the demo's guest B)")
    parser.add_argument("--user", default="Host")
    parser.add_argument("--voice", default="Guest B")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from cltune.data.demo import write_demo_corpus
    from cltune.serving.chat import Talker

    data = args.data
    if data is None:
        data = next(p for p in write_demo_corpus(tempfile.mkdtemp(prefix="chat-turns-")) if p.stem.endswith("_b"))
    lines = host_lines(data, args.user, args.turns)
    talker = Talker(args.checkpoint, "all")
    info = describe_machine()
    print(machine_line(info))
    print(f"checkpoint {args.checkpoint} (max_length {talker.max_length}), {args.turns} turns of {args.user} from "
          f"{data.name}, {args.voice} replies greedily, at most {args.max_new_tokens} tokens")
    one_chat(talker, lines[:2], args.voice, args.user, args.max_new_tokens)  # warm-up
    runs: dict[bool, list[list[dict]]] = {False: [], True: []}
    for r in range(args.rounds):
        for kv_cache in ((False, True) if r % 2 == 0 else (True, False)):
            talker.kv_cache = kv_cache
            runs[kv_cache].append(one_chat(talker, lines, args.voice, args.user, args.max_new_tokens))
    same = all(run == [row["reply"] for row in runs[True][0]]
               for run in ([row["reply"] for row in rows] for rows in runs[False] + runs[True]))
    print(f"replies identical with and without the cache in every round: {same}")
    print("| turn | prompt tokens | served by the cache | reply tokens | s without cache | s with cache | ratio |")
    print("|---|---|---|---|---|---|---|")
    table = []
    for t in range(args.turns):
        off = statistics.median(rows[t]["seconds"] for rows in runs[False])
        on = statistics.median(rows[t]["seconds"] for rows in runs[True])
        row = runs[True][0][t]
        reply_tokens = len(talker.tokenizer(row["reply"], add_special_tokens=False)["input_ids"])
        table.append({"turn": t + 1, "prompt": row["prompt"], "reused": row["reused"], "reply_tokens": reply_tokens,
                      "seconds_without": off, "seconds_with": on})
        print(f"| {t + 1} | {row['prompt']} | {row['reused']} | {reply_tokens} | {off:.3f} | {on:.3f} | "
              f"{off / on:.2f}× |")
    total_off = statistics.median(sum(r["seconds"] for r in rows) for rows in runs[False])
    total_on = statistics.median(sum(r["seconds"] for r in rows) for rows in runs[True])
    print(f"whole chat: {total_off:.2f} s without, {total_on:.2f} s with the cache ({total_off / total_on:.2f}×)")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "turns": table, "replies_identical": same,
                                         "total_without": total_off, "total_with": total_on}, indent=1))


if __name__ == "__main__":
    main()
