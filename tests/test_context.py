"""Context turns (`data.context_turns`): the encoding and its masks, which turns an utterance sees, the
scores, a stream with context and the report's replies in context (every strategy trains with context in
test_every_strategy.py), generation and chat after context."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cltune.data import Example, Split, Turn, build_task, load_dialogue
from cltune.errors import UserError
from cltune.modeling.batching import IGNORE, collate, encode, fit_context

from helpers import prepared, tiny_run_config, write_conversations


@pytest.fixture(scope="module")
def tok_model(tiny_model_dir):
    model, tokenizer, _ = prepared(tiny_model_dir, tokens=("<HOST>", "<GUEST_A>"))
    return model, tokenizer


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_context_turns_are_context_only_in_the_encoding_and_the_labels(tok_model):
    """A hand-built example: `<s> <HOST> so tell me </s> <GUEST_A> i love pizza </s> <HOST> what do you think </s>`;
    only the last utterance's text and end token are targets, packed beside a plain utterance or alone; each
    example begins with the start token."""
    _, tok = tok_model
    host, guest, end = tok.convert_tokens_to_ids(["<HOST>", "<GUEST_A>"]) + [tok.eos_token_id]
    bos = tok.bos_token_id
    assert bos is not None and bos not in (host, guest, end)
    context = (Turn("Host", "<HOST>", "so tell me", 2), Turn("Guest A", "<GUEST_A>", "i love pizza", 3))
    example = Example(0, "Host", "<HOST>", "what do you think", Split.TRAIN, 4, context)
    plain = Example(0, "Guest A", "<GUEST_A>", "music", Split.TRAIN, 5)
    seq, alone = encode([example, plain], tok, 64)
    prefix = [bos, host, *_ids(tok, "so tell me"), end, guest, *_ids(tok, "i love pizza"), end]
    target = [host, *_ids(tok, "what do you think"), end]
    assert list(seq) == prefix + target and seq.context == len(prefix)
    assert list(alone) == [bos, guest, *_ids(tok, "music"), end] and alone.context == 1

    batch = collate([seq, alone], [0, 1], pad_id=0, pack_length=128)  # one packed row: the longer example first
    assert batch.input_ids.tolist() == [list(seq) + list(alone)]
    assert batch.labels.tolist() == [[IGNORE] * (len(prefix) + 1) + target[1:] + [IGNORE] * 2 + list(alone)[2:]]
    assert batch.position_ids.tolist() == [list(range(len(seq))) + list(range(len(alone)))]
    assert batch.n_targets == len(target) - 1 + len(alone) - 2
    assert batch.target_example.tolist() == [0] * (len(target) - 1) + [1] * (len(alone) - 2)

    rows = collate([seq, alone], [0, 1], pad_id=0)  # one row each, padded
    assert rows.labels[0].tolist() == [IGNORE] * (len(prefix) + 1) + target[1:]
    assert rows.labels[1].tolist() == [IGNORE] * 2 + list(alone)[2:] + [IGNORE] * (len(seq) - len(alone))


def test_truncation_drops_the_oldest_context_first_and_never_the_target(tok_model):
    _, tok = tok_model
    host, guest, end = tok.convert_tokens_to_ids(["<HOST>", "<GUEST_A>"]) + [tok.eos_token_id]
    old, recent = "so tell me what do you think", "i really love pizza"
    example = Example(0, "Host", "<HOST>", "question today", Split.TEST, 9,
                      (Turn("Host", "<HOST>", old, 7), Turn("Guest A", "<GUEST_A>", recent, 8)))
    target = [host, *_ids(tok, "question today"), end]
    first, second = [host, *_ids(tok, old), end], [guest, *_ids(tok, recent), end]

    def encoded(max_length):  # (context after the start token, target)
        [seq] = encode([example], tok, max_length)
        assert seq[0] == tok.bos_token_id
        return list(seq[1 : seq.context]), list(seq[seq.context :])

    whole = 1 + len(target) + len(first) + len(second)  # the start token and every turn
    assert encoded(whole) == (first + second, target)  # everything fits
    # three tokens short of the whole: the oldest turn keeps its speaker token, the end of its text and its end
    assert encoded(whole - 3) == ([host, *first[4:]] + second, target)
    assert encoded(1 + len(target) + len(second) + 2) == (second, target)  # two tokens: too few for a turn, dropped
    assert encoded(1 + len(target)) == ([], target)
    # a target longer than max_length is cut (no end token) and leaves no room for context, as without context
    assert encoded(4) == ([], target[:3]) == ([], list(encode([Example(0, "Host", "<HOST>", "question today",
                                                                       Split.TEST, 9)], tok, 4)[0])[1:])
    assert fit_context([[1, 2, 8, 3], [4, 5, 6, 7]], 8) == [1, 2, 8, 3, 4, 5, 6, 7]
    assert fit_context([[1, 2, 8, 3], [4, 5, 6, 7]], 7) == [1, 8, 3, 4, 5, 6, 7]  # speaker, last text token, end
    assert fit_context([[1, 2, 8, 3], [4, 5, 6, 7]], 6) == [4, 5, 6, 7]
    assert fit_context([[1, 2, 8, 3], [4, 5, 6, 7]], 2) == []


def _task(path: Path, k: int, seed: int = 0, **load):
    dataset = load_dialogue(path, **load)
    tokens = {"Host": "<HOST>", "Guest A": "<GUEST_A>"}
    return dataset, build_task(dataset, 0, tokens, (0.6, 0.2, 0.2), seed, k)


@pytest.mark.parametrize("layout", ["column", "interleaved column", "blank rows"])
def test_context_never_crosses_a_conversation_or_a_split(tmp_path, layout):
    path = write_conversations(tmp_path / "a.csv", "Guest A", 12, seed=3, column=layout != "blank rows",
                               interleave=layout == "interleaved column")
    dataset, task = _task(path, 2)
    talk = {u.line: (u.conversation if u.conversation is not None else u.block) for u in dataset.utterances}
    split_of = {e.line: e.split for e in task.train + task.val + task.test}
    in_order = {}  # each conversation's lines in file order
    for u in dataset.utterances:
        in_order.setdefault(talk[u.line], []).append(u.line)
    assert len(in_order) == 12
    for example in task.train + task.val + task.test:
        lines = in_order[talk[example.line]]
        earlier = lines[: lines.index(example.line)]
        assert [t.line for t in example.context] == earlier[-2:]  # the two turns before it in its conversation
        assert all(split_of[t.line] is example.split for t in example.context)
        by_line = {u.line: u for u in dataset.utterances}
        assert [(t.speaker, t.text) for t in example.context] == [(by_line[n].speaker, by_line[n].text)
                                                                  for n in earlier[-2:]]
    test_lines = {e.line for e in task.test}
    trained = {e.line for e in task.train} | {t.line for e in task.train for t in e.context}
    assert test_lines and not test_lines & trained  # no test target, and no test target's context, is trained on
    assert sum(bool(e.context) for e in task.test) > 0


def test_context_turns_zero_keeps_every_utterance_alone(tmp_path, two_tasks):
    path = write_conversations(tmp_path / "a.csv", "Guest A", 12, seed=3, column=False)
    _, blank_k0 = _task(path, 0)
    _, blank_k2 = _task(path, 2)
    assert all(not e.context for e in blank_k0.train + blank_k0.val + blank_k0.test)
    # without context the blank rows do not group the split (per-utterance, stratified: as before)
    assert {e.line: e.split for e in blank_k0.test} != {e.line: e.split for e in blank_k2.test}
    with pytest.raises(UserError, match=r"guest_a.csv: data.context_turns 2 needs the file's conversations.*1 "
                                        r"blank-row-separated section.*separate conversations with a blank row"):
        _task(two_tasks[0], 2)


def test_a_file_that_is_one_conversation_splits_into_consecutive_parts_when_the_user_says_so(tmp_path, two_tasks):
    """Without conversations in the file, context needs `data.one_conversation_per_file` (the error says so); with
    it the file's first turns train, the next validate, the last test, and no context crosses a part."""
    from cltune.data.split import WindowSettings

    with pytest.raises(UserError, match=r"set data.one_conversation_per_file: true if each file is one conversation"):
        _task(two_tasks[0], 2)
    dataset = load_dialogue(two_tasks[0])
    tokens = {"Host": "<HOST>", "Guest A": "<GUEST_A>"}
    lengths = lambda texts: [len(t.split()) + 2 for t in texts]  # noqa: E731 - a word a token
    for k, windows in ((2, None), ("all", WindowSettings(lengths, 40, None))):
        task = build_task(dataset, 0, tokens, (0.8, 0.1, 0.1), 0, k, windows, whole_file=True)
        lines = {split: [e.line for e in part] for split, part in (("train", task.train), ("val", task.val),
                                                                   ("test", task.test))}
        assert (len(lines["train"]), len(lines["val"]), len(lines["test"])) == (48, 6, 6)  # 60 rows, 80/10/10
        assert max(lines["train"]) < min(lines["val"]) and max(lines["val"]) < min(lines["test"])
        for split, part in (("train", task.train), ("val", task.val), ("test", task.test)):
            assert all(t.line in lines[split] and t.line < e.line for e in part for t in e.context)
        assert sum(bool(e.context) for e in task.test) >= 5  # the test part is a conversation of its own


def test_a_score_with_context_counts_the_target_tokens_only(tok_model):
    """The scorer's NLL of an example with context equals −Σ log p over its target tokens from a plain forward
    of the whole sequence; its target count is the target's, as without context."""
    from accelerate import Accelerator

    from cltune.evaluation.evaluate import example_nll
    from cltune.modeling.scoring import TokenScorer

    model, tok = tok_model
    context = (Turn("Host", "<HOST>", "so tell me", 2), Turn("Guest A", "<GUEST_A>", "i love pizza", 3))
    example = Example(0, "Host", "<HOST>", "what do you think", Split.TEST, 4, context)
    [seq] = encode([example], tok, 64)
    total, count = example_nll(Accelerator(cpu=True), TokenScorer(model), [seq], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(seq)])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    first = seq.context + 1
    by_hand = -sum(log_probs[i - 1, seq[i]].item() for i in range(first, len(seq)))
    assert total.item() == pytest.approx(by_hand, rel=1e-5)
    assert count.item() == len(seq) - first == len(encode([Example(0, "Host", "<HOST>", "what do you think",
                                                                   Split.TEST, 4)], tok, 64)[0]) - 2


@pytest.fixture(scope="module")
def context_streams(tiny_model_dir, tmp_path_factory):
    """`streams(k)` → (run folder, RunMetrics) of a naive two-task stream whose files have a conversation
    column, with `data.context_turns` k; run once per k per module."""
    from cltune.api import make_config
    from cltune.studies.pipeline import run_stream

    folder, cache = tmp_path_factory.mktemp("context"), {}
    csvs = [write_conversations(folder / "guest_a.csv", "Guest A", 14, 1),
            write_conversations(folder / "guest_b.csv", "Guest B", 10, 2)]

    def streams(k: int):
        if k not in cache:
            raw = tiny_run_config(tiny_model_dir, csvs, folder / "runs", "naive", name=f"naive-k{k}")
            raw["data"] = {"max_length": 48, "context_turns": k}
            cache[k] = (Path(raw["output_dir"]) / raw["name"], run_stream(make_config(raw)))
        return cache[k]

    return streams


def test_a_stream_with_context_scores_the_same_targets_and_shows_replies_in_context(context_streams):
    from cltune.report import write_report

    alone_dir, alone = context_streams(0)
    run_dir, metrics = context_streams(2)
    assert (alone.context_turns, metrics.context_turns) == (0, 2)
    assert json.loads((run_dir / "metrics.json").read_text())["context_turns"] == 2
    # the same test utterances and target tokens with and without context: perplexities compare directly
    with_context, without = (json.loads((d / "test_nll.json").read_text())["single"] for d in (run_dir, alone_dir))
    for task in ("guest_a", "guest_b"):
        assert with_context[task]["lines"] == without[task]["lines"]
        assert with_context[task]["targets"] == without[task]["targets"]
        assert with_context[task]["nll"] != without[task]["nll"]
    assert [p.target_tokens for p in metrics.phases] == [p.target_tokens for p in alone.phases]
    # samples: one per speaker of each task after each phase, each answering a real test context
    assert [(s.phase, s.task, s.speaker) for s in metrics.samples] == [
        (phase, task, speaker) for phase in (1, 2) for task, guest in (("guest_a", "Guest A"), ("guest_b", "Guest B"))
        for speaker in ("Host", guest)]
    by_line = {}
    for path in (run_dir.parent.parent / "guest_a.csv", run_dir.parent.parent / "guest_b.csv"):
        by_line[path.stem] = [(u.speaker, u.text) for u in load_dialogue(path).utterances]
    for sample in metrics.samples:
        turns = by_line[sample.task]
        at = [i for i, turn in enumerate(turns) if turn == (sample.speaker, sample.reference)]
        assert at and any([list(t) for t in turns[i - len(sample.context) : i]] == sample.context for i in at)
        assert 1 <= len(sample.context) <= 2
    assert all(not s.context and s.reference is None for s in alone.samples)
    md, _ = write_report(run_dir)
    report = md.read_text()
    assert "## Replies in context" in report and metrics.samples[0].reference[:40] in report


def test_generation_prompts_are_encoded_as_training_encodes(context_streams, tmp_path, monkeypatch, capsys):
    """`cltune generate --context` prompts with the turns as training encodes a target's context, and prints
    what the library's own call returns; an unknown speaker in the file is refused with its line."""
    from contextlib import nullcontext

    from cltune.modeling.generate import generate_mixture, sample_continuations
    from cltune.serving.chat import Sampling, Talker, read_context

    from helpers import run_cli

    run_dir, _ = context_streams(2)
    capsys.readouterr()  # the stream's progress, when this test trained it
    phase = run_dir / "phase2"
    talker = Talker(phase)
    assert (talker.context_turns, talker.max_length) == (2, 48)
    context = tmp_path / "context.csv"
    context.write_text("speaker,text\nHost,so tell me\nGuest A,i love pizza\nHost,what do you think\n")
    history = read_context(talker, context)
    ids, start = talker.prompt(history, "<GUEST_A>")
    turns = tuple(Turn(s, t, x, 0) for (t, x), s in zip(history[-2:], ("Guest A", "Host")))
    [training] = encode([Example(0, "Guest A", "<GUEST_A>", "music", Split.TEST, 5, turns)], talker.tokenizer, 48)
    assert ids == list(training[: training.context + 1]) and start == training.context

    direct = talker.reply(history, "<GUEST_A>", sampling=Sampling(max_new_tokens=6, seed=4))
    result = run_cli(monkeypatch, capsys, "generate", phase, "--speaker", "guest a", "--context", context,
                    "--max-new-tokens", "6", "--seed", "4")
    assert result.code == 0, result.err
    assert result.out.strip() == direct
    assert run_cli(monkeypatch, capsys, "generate", phase, "--speaker", "guest a", "--context", context,
                  "--context-turns", "0", "--max-new-tokens", "6", "--seed", "4").out.strip() == \
        Talker(phase, 0).reply(history, "<GUEST_A>", sampling=Sampling(max_new_tokens=6, seed=4))
    context.write_text("speaker,text\nHost,so tell me\nNobody,hello\n")
    refused = run_cli(monkeypatch, capsys, "generate", phase, "--speaker", "guest a", "--context", context)
    assert refused.code == 2 and f"{context}: line 3: unknown speaker 'Nobody'" in refused.err

    # the mixture of one candidate after a context is greedy decoding's output
    model, tokenizer = talker.model, talker.tokenizer
    greedy = sample_continuations(model, tokenizer, [ids], max_new_tokens=5, temperature=0, top_p=1, seed=0,
                                  batch_size=1)[0]
    assert generate_mixture(model, tokenizer, lambda: [nullcontext()], ids, max_new_tokens=5, temperature=0,
                            start=start) == greedy


def test_chat_script_end_to_end(context_streams, tmp_path, monkeypatch, capsys):
    """`cltune chat --script`: each line is the user's turn or a command; the replies are streamed as
    `Name: text` and are exactly what the library gives for the conversation so far (last two turns)."""
    from cltune.serving.chat import Sampling, Talker

    from helpers import run_cli

    run_dir, _ = context_streams(2)
    capsys.readouterr()  # the stream's progress, when this test trained it
    phase = run_dir / "phase2"
    script = tmp_path / "script.txt"
    script.write_text("so tell me\nwhat do you think\n/speaker Nobody\n/reset\n/speaker host\nquestion today\n"
                      "/quit\nnever answered\n")
    result = run_cli(monkeypatch, capsys, "chat", phase, "--as", "Guest A", "--script", script,
                    "--max-new-tokens", "5", "--seed", "1")
    assert result.code == 0, result.err

    talker = Talker(phase)
    HOST, GUEST = "<HOST>", "<GUEST_A>"

    def reply(history, voice, line_number):
        return talker.reply(history, voice, sampling=Sampling(5, 0.8, 0.95, 1 + line_number))

    first = reply([(HOST, "so tell me")], GUEST, 0)
    second = reply([(HOST, "so tell me"), (GUEST, first), (HOST, "what do you think")], GUEST, 1)
    third = reply([(HOST, "question today")], HOST, 5)
    lines = result.out.splitlines()
    assert lines[0] == f"Guest A: {first}" and lines[1] == f"Guest A: {second}"
    assert lines[2].startswith("error: ") and "unknown speaker 'Nobody'" in lines[2]
    assert lines[3:] == ["(conversation reset)", "(Host answers now)", f"Host: {third}"]
    assert talker.prompt([(HOST, "so tell me"), (GUEST, first), (HOST, "what do you think")], GUEST) == \
        talker.prompt([(GUEST, first), (HOST, "what do you think")], GUEST)  # only the last two turns are shown

    alone_dir, _ = context_streams(0)
    without = run_cli(monkeypatch, capsys, "chat", alone_dir / "phase2", "--as", "Guest A", "--script", script,
                     "--max-new-tokens", "3")
    assert without.code == 0 and "trained without context turns" in without.out
    missing = run_cli(monkeypatch, capsys, "chat", phase, "--as", "Guest A", "--script", tmp_path / "nope.txt")
    assert missing.code == 2 and "nope.txt: cannot read the script" in missing.err


def test_a_whole_conversation_chat_reuses_its_cache_inside_a_window_and_replies_as_without_it(context_streams):
    """`context_turns: all`: each turn's prompt is the current window (training's rule, the reply counted at its
    budget); inside a window the next prompt extends the last prompt, and the cache serves all of that prefix;
    a new window starts over. Greedy replies with the cache are the replies without it."""
    import io

    from rich.console import Console

    from cltune.serving.chat import Sampling, Talker, chat

    run_dir, _ = context_streams("all")
    phase = run_dir / "phase2"
    lines = [f"hi {i}" for i in range(12)]
    runs = {}
    for kv_cache in (True, False):
        talker = Talker(phase, kv_cache=kv_cache)
        assert talker.context_turns == "all" and talker.max_length == 48
        reused, prompts = [], []
        original = talker.prompt

        def prompt(history, token, text="", reply_budget=0, talker=talker, original=original, prompts=prompts):
            prompts.append(original(history, token, text, reply_budget)[0])
            return original(history, token, text, reply_budget)

        talker.prompt = prompt
        original_reply = talker.reply

        def reply(*args, talker=talker, original_reply=original_reply, reused=reused, **kwargs):
            text = original_reply(*args, **kwargs)
            reused.append(talker.caches["<GUEST_A>"].reused if talker.kv_cache else 0)
            return text

        talker.reply = reply
        history = chat(talker, "Guest A", "Host", lines, Console(file=io.StringIO(), width=200),
                       sampling=Sampling(max_new_tokens=4, temperature=0))
        runs[kv_cache] = (history, prompts, reused)
    (history, prompts, reused), (plain_history, plain_prompts, _) = runs[True], runs[False]
    assert history == plain_history and prompts == plain_prompts and len(prompts) == len(lines)
    assert all(len(p) + 4 + 1 <= 48 for p in prompts)  # prompt and reply budget inside a training window
    kinds = set()
    for before, after, served in zip(prompts, prompts[1:], reused[1:]):
        extends = after[: len(before)] == before
        kinds.add(extends)
        assert served >= len(before) if extends else served < len(before)
    assert kinds == {True, False}  # the conversation outgrew a window at least once


def test_chat_stops_a_reply_on_ctrl_c_and_ends_at_end_of_input():
    """Ctrl-C while a reply is generated drops that exchange and the conversation goes on; typed input ends
    at end of input (EOFError) with the conversation so far."""
    import io

    from rich.console import Console

    from cltune.serving.chat import chat

    class Fake:
        checkpoint, context_turns = Path("ckpt"), 2
        tokens = {"Host": "<HOST>", "Guest A": "<GUEST_A>"}
        calls = 0

        def token(self, speaker, where=None):
            return self.tokens[speaker]

        def partner(self, token):
            return "<HOST>"

        def name(self, token):
            return {v: k for k, v in self.tokens.items()}[token]

        def reply(self, history, token, sampling, emit):
            self.calls += 1
            if self.calls == 1:
                raise KeyboardInterrupt
            emit("fine")
            return "fine"

    typed = iter(["hello", "how are you", "/quit"])

    def ask(label):
        assert label == "Host: "
        return next(typed)

    buffer = io.StringIO()
    history = chat(Fake(), "Guest A", None, None, Console(file=buffer, width=200), ask=ask)
    assert buffer.getvalue().splitlines() == ["Guest A:  (stopped)", "Guest A: fine"]
    assert history == [("<HOST>", "how are you"), ("<GUEST_A>", "fine")]

    def ended(label):
        raise EOFError

    assert chat(Fake(), "Guest A", None, None, Console(file=io.StringIO()), ask=ended) == []


def test_the_text_stream_emits_whole_characters_and_the_stripped_text(tok_model):
    from cltune.modeling.generate import TextStream

    _, tok = tok_model
    ids = _ids(tok, " so é tell me  ✓ ")
    pieces = []
    stream = TextStream(tok, pieces.append)
    stream.put(torch.tensor([[5, 6]]))  # the prompt, skipped
    for i in ids:
        stream.put(torch.tensor([i]))
    stream.end()
    assert "".join(pieces) == tok.decode(ids).strip() == "so é tell me  ✓"
    assert all(piece and "\ufffd" not in piece for piece in pieces) and len(pieces) > 3


def test_packing_gives_the_same_steps_with_context_as_one_example_per_row(tiny_model_dir, tmp_path):
    """Packed rows restart positions at each example (context included), so each example attends to its own
    context only: the step losses match the unpacked run's."""
    from cltune.api import make_config
    from cltune.studies.pipeline import run_stream

    csvs = [write_conversations(tmp_path / "guest_a.csv", "Guest A", 14, 1)]
    losses = {}
    for packing in (False, True):
        raw = tiny_run_config(tiny_model_dir, csvs, tmp_path / "runs", "naive", name=f"packed-{packing}")
        raw["data"] = {"max_length": 48, "context_turns": 2}
        raw["train"].update(packing=packing, pack_length=128, max_steps=3)
        raw["eval"] = {"attribution": False, "samples_per_speaker": 0, "batch_size": 16}
        run_stream(make_config(raw))
        log = tmp_path / "runs" / f"packed-{packing}" / "phase1" / "train_log.jsonl"
        losses[packing] = [json.loads(line)["loss"] for line in log.read_text().splitlines() if '"loss"' in line]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
