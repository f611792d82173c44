"""`data.context_turns: all`: conversations cut into windows, each window computed in one row, each target scored
exactly once and exactly as it would be alone after the same turns."""

from __future__ import annotations

import json
import random
import subprocess

import pytest
import torch
import yaml

from helpers import QUIET_EVAL, cltune_command, prepared, tiny_run_config, write_conversations


def _check_plan(lengths, targets, max_length):
    from cltune.data.windows import plan_windows

    plan = plan_windows(lengths, targets, max_length)
    starts = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    chosen = [t for _, ts in plan for t in ts]
    assert sorted(chosen) == [i for i, t in enumerate(targets) if t]  # every target once, nothing else
    for start, ts in plan:
        for t in ts:
            assert start <= t and starts[t + 1] - starts[start] <= max_length  # inside the window with its context
            context = starts[t] - starts[start]
            fits = max_length - lengths[t]
            # all of the conversation before it, or at least half a window, unless the target leaves less room
            assert context == starts[t] or context >= max_length // 2 or \
                (start < t and starts[t] - starts[start - 1] > fits) or (start == t and lengths[t - 1] > fits), \
                (lengths, targets, plan)
    return plan


def test_windows_score_every_target_once_with_at_least_half_a_window_before_it():
    """The window rule over many random conversations: every target turn is a target of one window only, inside
    it, after all of its conversation or at least half a window of it (unless the target itself is too long for
    that); turns of other speakers are never targets; a conversation that fits is one window with every target."""
    rng = random.Random(0)
    for _ in range(400):
        n = rng.randint(1, 30)
        max_length = rng.choice([16, 24, 48, 100])
        lengths = [rng.randint(3, max_length) if rng.random() < 0.1 else rng.randint(3, 12) for _ in range(n)]
        targets = [rng.random() < 0.7 for _ in range(n)]
        _check_plan(lengths, targets, max_length)
    assert _check_plan([5, 6, 7], [True, True, True], 24) == [(0, [0, 1, 2])]
    assert _check_plan([5, 6, 7], [False, True, False], 24) == [(0, [1])]
    # longer than a window: the second window starts at the latest turn that leaves ≥ 12 tokens of context
    assert _check_plan([8, 8, 8, 8], [True] * 4, 24) == [(0, [0, 1, 2]), (1, [3])]


def test_a_windowed_task_keeps_other_speakers_as_context_only(tmp_path):
    """`data.targets` names the trained speakers: the others' turns appear in contexts, never as examples, and
    every example's context is the turns before it in its window (in file order, inside its conversation)."""
    from cltune.data import assign_speaker_tokens, build_task, load_dialogue
    from cltune.data.split import WindowSettings

    path = write_conversations(tmp_path / "talks.csv", "Guest A", 12, 3)
    dataset = load_dialogue(path)
    tokens = assign_speaker_tokens(dataset.speakers, {})
    lengths = lambda texts: [len(t.split()) + 2 for t in texts]  # noqa: E731 - a word a token
    task = build_task(dataset, 0, tokens, (0.6, 0.2, 0.2), 0, "all", WindowSettings(lengths, 12, ("Guest A",)))
    examples = task.train + task.val + task.test
    assert examples and {e.speaker for e in examples} == {"Guest A"}
    assert any(turn.speaker == "Host" for e in examples for turn in e.context)
    rows = {u.line: u for u in dataset.utterances}
    for e in examples:
        assert e.window is not None
        assert all(rows[t.line].conversation == rows[e.line].conversation and t.line < e.line for t in e.context)
        assert sum(len(t.text.split()) + 2 for t in e.context) + len(e.text.split()) + 2 <= 12
    every = build_task(dataset, 0, tokens, (0.6, 0.2, 0.2), 0, "all", WindowSettings(lengths, 12, None))
    assert len(every.train + every.val + every.test) == len(dataset.utterances)


def test_a_window_is_one_row_and_each_target_scores_as_it_would_alone(tiny_model_dir):
    """Three turns of one window: `collate(merge=True)` computes them as one row of the longest, labels each
    target where it stands and owns it; each utterance's summed NLL from that row equals the NLL of the same
    utterance encoded alone after the same turns (float tolerance), and the row costs the longest's positions
    only. Packing puts two windows in one row with the same figures."""
    from cltune.data.split import Example, Split, Turn
    from cltune.modeling.batching import collate, encode
    from cltune.modeling.scoring import TokenScorer, per_example_sums, target_nll

    model, tokenizer, _ = prepared(tiny_model_dir, ("<HOST>", "<GUEST_A>"))
    texts = [("Host", "<HOST>", "hello there friend"), ("Guest A", "<GUEST_A>", "good morning to you"),
             ("Host", "<HOST>", "how was the trip")]
    turns = [Turn(s, t, x, i) for i, (s, t, x) in enumerate(texts)]
    window = [Example(0, s, t, x, Split.TEST, i, tuple(turns[:i]), window="c0/test/0")
              for i, (s, t, x) in enumerate(texts)]
    alone = [Example(0, e.speaker, e.token, e.text, e.split, e.line, e.context) for e in window]
    scorer = TokenScorer(model).eval()

    def sums(examples, merge, pack=None):
        encoded = encode(examples, tokenizer, 128)
        batch = collate(encoded, list(range(len(encoded))), tokenizer.pad_token_id, pack, merge)
        with torch.no_grad():
            nll = target_nll(scorer(**batch.model_inputs()), batch.labels)
        return per_example_sums(nll.double(), batch.target_example, len(examples)), batch

    merged, one_row = sums(window, True)
    separate, rows = sums(alone, False)
    assert one_row.input_ids.shape[0] == 1 and rows.input_ids.shape[0] == 3
    assert one_row.n_targets == rows.n_targets and one_row.n_tokens == len(encode(window, tokenizer, 128)[-1])
    assert torch.allclose(merged, separate, rtol=1e-5, atol=1e-5) and (merged > 0).all()
    swapped = [window[0], window[1], Example(0, "Guest A", "<GUEST_A>", texts[2][2], Split.TEST, 2,
                                            tuple(turns[:2]), window="c0/test/0")]
    _, variant = sums(swapped, True)
    assert variant.input_ids.shape[0] == 1  # the earlier turns are still prefixes of the variant
    # packing composes: two windows packed into one row, each target still scored as alone
    second = [Example(0, e.speaker, e.token, e.text, e.split, e.line + 10, e.context, window="c1/test/0")
              for e in window[:2]]
    packed, packed_row = sums(window + second, True, 128)
    assert packed_row.input_ids.shape[0] == 1
    assert torch.allclose(packed, torch.cat([separate, separate[:2]]), rtol=1e-5, atol=1e-5)
    other_token = Example(0, "Host", "<GUEST_A>", texts[0][2], Split.TEST, 0, (), window="c0/test/0")
    _, split_off = sums([window[2], other_token], True)
    assert split_off.input_ids.shape[0] == 2  # another speaker token on the first turn: not a prefix, its own row


def test_a_windows_lead_is_computed_forward_only(tiny_model_dir):
    """`collate(lead=True)`: each row's lead (start token and the turns before its first target) goes through the
    model without a graph. The logits are those of the whole rows (two rows, leads of different lengths, the
    short row padded); the gradients equal those of the model run row by row — the lead under no_grad into a
    key/value cache, the rest after it — and differ from the whole rows' (the lead's keys and values no longer
    train); the ledger counts no backward for the leads; without a graph, the lead changes nothing."""
    from transformers import DynamicCache

    from cltune.data.split import Example, Split, Turn
    from cltune.modeling.batching import IGNORE, collate, encode
    from cltune.modeling.scoring import TokenScorer, target_nll

    model, tokenizer, _ = prepared(tiny_model_dir, ("<HOST>", "<GUEST_A>", "<GUEST_B>"))
    lead_turns = (Turn("Guest B", "<GUEST_B>", "we met at the station", 0), Turn("Host", "<HOST>", "hello there", 1))
    examples = [Example(0, "Guest A", "<GUEST_A>", "good morning to you", Split.TRAIN, 2, lead_turns, "c0/train/1"),
                Example(0, "Host", "<HOST>", "how was the trip", Split.TRAIN, 3,
                        (*lead_turns, Turn("Guest A", "<GUEST_A>", "good morning to you", 2)), "c0/train/1"),
                Example(0, "Host", "<HOST>", "fine", Split.TRAIN, 4, (), "c1/train/0")]
    encoded = encode(examples, tokenizer, 128)
    scorer = TokenScorer(model).train()
    trained = [p for p in model.parameters() if p.requires_grad]

    def gradients(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trained]

    def run(lead):
        batch = collate(encoded, [0, 1, 2], tokenizer.pad_token_id, merge=True, lead=lead)
        before = scorer.backward_tokens
        logits = scorer(**batch.model_inputs())
        backward = scorer.backward_tokens - before
        return batch, logits.detach(), gradients(target_nll(logits, batch.labels).sum()), backward

    apart, logits_apart, grad_apart, backward_apart = run(True)
    whole, logits_whole, grad_whole, backward_whole = run(False)
    assert apart.lead.tolist() == [encoded[0].context, encoded[2].context]  # rows: the window, the short one
    assert apart.row_tokens.tolist() == [len(encoded[1]), len(encoded[2])] and whole.lead is None
    assert apart.input_ids.shape == whole.input_ids.shape == (2, len(encoded[1]))
    assert torch.allclose(logits_apart, logits_whole, rtol=1e-5, atol=1e-5)
    assert backward_whole - backward_apart == sum(apart.lead.tolist()) > 2

    loss = 0.0  # the reference: each row alone, its lead under no_grad into a cache
    for r, (p, n) in enumerate(zip(apart.lead.tolist(), apart.row_tokens.tolist())):
        ids, labels, cache = apart.input_ids[r : r + 1, :n], apart.labels[r, :n], DynamicCache()
        with torch.no_grad():
            model(input_ids=ids[:, :p], cache=cache, use_cache=True)
        logits = model(input_ids=ids[:, p:], position_ids=torch.arange(p, n)[None], cache=cache,
                       use_cache=True).logits[0, :-1]
        loss = loss + torch.nn.functional.cross_entropy(logits, labels[p + 1 :], ignore_index=IGNORE,
                                                        reduction="sum")
    reference = gradients(loss)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grad_apart, reference))
    assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grad_apart, grad_whole))
    with torch.no_grad():  # without a graph the rows are computed whole: the lead changes nothing
        assert torch.equal(scorer(**apart.model_inputs()), scorer(**whole.model_inputs()))


def test_attribution_variants_branch_off_their_window(tiny_model_dir):
    """Every utterance of two windows scored under each of three speaker tokens (what attribution does):
    `collate(branch=True)` computes each window once and each variant with another token as a branch that
    reads the window's keys and values for its context; every variant's summed NLL equals the variant scored
    alone after the same turns, and the positions computed are the windows' plus the branches' own tokens."""
    from dataclasses import replace

    from cltune.data.split import Example, Split, Turn
    from cltune.modeling.batching import collate, encode
    from cltune.modeling.scoring import TokenScorer, per_example_sums, target_nll

    tokens = ("<HOST>", "<GUEST_A>", "<GUEST_B>")
    model, tokenizer, _ = prepared(tiny_model_dir, tokens)
    scorer = TokenScorer(model).eval()
    lines = [("Host", "<HOST>", "hello there friend"), ("Guest A", "<GUEST_A>", "good morning to you"),
             ("Host", "<HOST>", "how was the trip"), ("Guest A", "<GUEST_A>", "long and slow")]
    window = []
    for c, talk in enumerate((lines, lines[:2])):
        turns = [Turn(sp, tok, text, i) for i, (sp, tok, text) in enumerate(talk)]
        window += [Example(0, sp, tok, text, Split.TEST, 10 * c + i, tuple(turns[:i]), window=f"c{c}/test/0")
                   for i, (sp, tok, text) in enumerate(talk)]
    variants = [replace(e, token=t) for e in window for t in tokens]
    encoded = encode(variants, tokenizer, 128)

    def sums(batch):
        before = scorer.forward_tokens
        with torch.no_grad():
            nll = target_nll(scorer(**batch.model_inputs()), batch.labels)
        return per_example_sums(nll.double(), batch.target_example, len(variants)), scorer.forward_tokens - before

    branched = collate(encoded, list(range(len(encoded))), tokenizer.pad_token_id, merge=True, branch=True)
    alone = collate(encoded, list(range(len(encoded))), tokenizer.pad_token_id)
    got, computed = sums(branched)
    want, _ = sums(alone)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5) and (got > 0).all()
    whole = branched.source == torch.arange(len(branched.source))
    assert int(whole.sum()) == 2 and len(branched.source) == 2 + (len(tokens) - 1) * len(window)
    own = [i for i, v in enumerate(variants) if v.token == window[i // len(tokens)].token]
    others = [i for i, v in enumerate(variants) if i not in own]
    carriers = [own[3], own[5]]  # each window's last utterance with its own token
    assert computed == sum(len(encoded[i]) for i in carriers) + sum(len(encoded[i]) - encoded[i].context
                                                                      for i in others)
    assert computed < branched.input_ids.numel() / 3


def test_context_turns_all_trains_and_scores_whole_windows(tiny_model_dir, tmp_path):
    """`cltune run` with `context_turns: all`: it trains and scores, metrics.json says which mode made the
    matrix, the untrained model's row equals scoring each utterance after the same turns on its own row
    (`context_turns` large enough to show every earlier turn), and training costs the windows' positions: less
    than half of what those rows cost."""
    csvs = [write_conversations(tmp_path / "guest_a.csv", "Guest A", 14, 1),
            write_conversations(tmp_path / "guest_b.csv", "Guest B", 10, 2)]
    runs = {}
    for mode in ("all", 50):
        raw = tiny_run_config(tiny_model_dir, csvs, tmp_path / "runs", "naive", name=f"ctx-{mode}", eval=QUIET_EVAL)
        raw["data"] = {"max_length": 400, "context_turns": mode}
        config = tmp_path / f"{mode}.yaml"
        config.write_text(yaml.safe_dump(raw))
        proc = subprocess.run(cltune_command("run", config), capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        runs[mode] = json.loads((tmp_path / "runs" / f"ctx-{mode}" / "metrics.json").read_text())
    window, each = runs["all"], runs[50]
    assert window["context_turns"] == "all" and each["context_turns"] == 50
    assert [p["target_tokens"] for p in window["phases"]] == [p["target_tokens"] for p in each["phases"]]
    forward = [p["strategy"]["training_forward_tokens"] for p in window["phases"]]
    assert all(f < e["strategy"]["training_forward_tokens"] / 2 for f, e in zip(forward, each["phases"])), forward
    assert len(window["ppl"]) == 3 and all(v > 1 for row in window["ppl"] for v in row)
    # the untrained model's row: every test utterance after all of its conversation before it, either way
    assert window["ppl"][0] == pytest.approx(each["ppl"][0], rel=1e-5)


def test_window_lead_grad_false_trains_without_a_graph_through_the_leads(tiny_model_dir, tmp_path):
    """`cltune run` at a window small enough to slide, with and without `train.window_lead_grad`: the same forward
    positions, fewer with a graph when the leads are computed forward only, the same target tokens, and a
    different validation loss after training (the gradient differs)."""
    csvs = [write_conversations(tmp_path / "guest_a.csv", "Guest A", 14, 1)]
    runs = {}
    for grad in (True, False):
        raw = tiny_run_config(tiny_model_dir, csvs, tmp_path / "runs", "naive", name=f"lead-{grad}", eval=QUIET_EVAL)
        raw["data"] = {"max_length": 40, "context_turns": "all"}
        raw["train"]["window_lead_grad"] = grad
        config = tmp_path / f"lead-{grad}.yaml"
        config.write_text(yaml.safe_dump(raw))
        proc = subprocess.run(cltune_command("run", config), capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        runs[grad] = json.loads((tmp_path / "runs" / f"lead-{grad}" / "metrics.json").read_text())["phases"][0]
    whole, apart = runs[True]["strategy"], runs[False]["strategy"]
    assert whole["training_forward_tokens"] == apart["training_forward_tokens"] == whole["training_backward_tokens"]
    assert apart["training_backward_tokens"] < 0.8 * whole["training_backward_tokens"]
    assert runs[True]["target_tokens"] == runs[False]["target_tokens"]
    assert runs[True]["best_val_loss"] != runs[False]["best_val_loss"]


def test_targets_need_whole_conversations_and_name_speakers_that_exist(cli, tiny_model_dir, tmp_path):
    csvs = [write_conversations(tmp_path / "guest_a.csv", "Guest A", 14, 1)]
    raw = tiny_run_config(tiny_model_dir, csvs, tmp_path / "runs", "naive", eval=QUIET_EVAL)
    raw["data"] = {"max_length": 64, "targets": ["Guest A"]}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    needs = cli("run", config)
    assert needs.code == 2 and "data.targets picks the trained speakers of whole conversations; it needs " \
                               "data.context_turns: all" in needs.err, needs.err
    raw["data"] = {"max_length": 64, "context_turns": "all", "targets": ["Guest Z"]}
    config.write_text(yaml.safe_dump(raw))
    unknown = cli("run", config)
    assert unknown.code == 2 and "data.targets: 'Guest Z' speak in no task file; the speakers are Guest A, Host" \
        in unknown.err, unknown.err


def test_training_steps_keep_windows_whole():
    """The training plan in window mode: every utterance once an epoch, a window's utterances always in one
    micro-batch (its one row), at least `batch_size` utterances a step (the last of an epoch may have fewer), and
    no micro-batch wider than the position budget unless one window alone is."""
    from cltune.config import PhaseSettings
    from cltune.training.loop import plan_steps

    rng = random.Random(1)
    windows, lengths = [], []
    for w in range(40):
        for _ in range(rng.randint(1, 9)):
            windows.append(f"c{w}")
            lengths.append(rng.randint(5, 90))
    windows += [None, None]
    lengths += [7, 9]
    settings = PhaseSettings(epochs=2, batch_size=16)
    plan = plan_steps(lengths, settings, 0, 200, 4, windows=windows)
    for epoch in (0, 1):
        steps = [mbs for e, mbs in plan if e == epoch]
        seen = [i for mbs in steps for mb in mbs for i in mb]
        assert sorted(seen) == list(range(len(lengths)))
        assert all(sum(map(len, mbs)) >= 16 for mbs in steps[:-1])
        for mbs in steps:
            for mb in mbs:
                rows = {windows[i] if windows[i] is not None else i for i in mb}
                widest = max(max(lengths[j] for j in range(len(lengths)) if windows[j] == r) if isinstance(r, str)
                             else lengths[r] for r in rows)
                assert len(rows) <= 4 and (len(rows) == 1 or len(rows) * widest <= 200)
                for r in rows:  # whole windows only
                    if isinstance(r, str):
                        assert all(i in mb for i in range(len(lengths)) if windows[i] == r)
    assert plan != plan_steps(lengths, settings, 1, 200, 4, windows=windows)  # the seed orders the windows
    assert plan_steps(lengths, PhaseSettings(epochs=2, batch_size=16, max_steps=3), 0, 200, 4, windows=windows) \
        == plan[:3]


def test_replay_keeps_whole_windows_so_a_replayed_window_is_one_row(tmp_path):
    """With whole conversations the replay sample is whole windows in seeded order (the last one cut to the
    count): as many targets as without windows, from as few windows as that allows."""
    from cltune.data import assign_speaker_tokens, build_task, load_dialogue
    from cltune.data.split import WindowSettings
    from cltune.strategies.replay import replay_sample

    path = write_conversations(tmp_path / "talks.csv", "Guest A", 12, 3)
    dataset = load_dialogue(path)
    tokens = assign_speaker_tokens(dataset.speakers, {})
    lengths = lambda texts: [len(t.split()) + 2 for t in texts]  # noqa: E731 - a word a token
    train = build_task(dataset, 0, tokens, (0.6, 0.2, 0.2), 0, "all", WindowSettings(lengths, 24, None)).train
    windows: dict[str, list] = {}
    for e in train:
        windows.setdefault(e.window, []).append(e)
    assert len(windows) > 4 and max(len(v) for v in windows.values()) > 1
    sample = replay_sample(train, 0.3, seed=5)
    assert len(sample) == round(0.3 * len(train))
    chosen = list(dict.fromkeys(e.window for e in sample))
    assert all(windows[w] == [e for e in sample if e.window == w] for w in chosen[:-1])  # whole windows, in order
    assert [e for e in sample if e.window == chosen[-1]] == windows[chosen[-1]][: len(sample) - sum(
        len(windows[w]) for w in chosen[:-1])]
    assert replay_sample(train, 0.3, seed=5) == sample and replay_sample(train, 0.3, seed=6) != sample
    assert len(replay_sample(train, 0.3, seed=5, cap=3)) == 3
