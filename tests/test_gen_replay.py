"""gen_replay: quotas and draws against hand-computed values, seeded sampling, and a 2-task stream
whose saved samples and phase-2 training data are checked."""

from __future__ import annotations

import json

import pytest

from cltune.data.split import Example, Split, TaskData
from cltune.modeling.generate import sample_continuations, sample_utterances
from cltune.strategies.gen_replay import (
    GENERATED_LINE,
    Draw,
    GenReplay,
    draw_seed,
    plan_draws,
    speaker_quotas,
    task_quota,
)
from cltune.studies import pipeline
from cltune.training import session


def _task(index: int, counts: dict[str, int]) -> TaskData:
    tokens = {s: f"<{s.upper()}>" for s in counts}
    train = [Example(index, s, tokens[s], f"{s} {i}", Split.TRAIN, i) for s, n in counts.items() for i in range(n)]
    test = [Example(index, s, tokens[s], "held out", Split.TEST, 999) for s in counts]
    return TaskData(index, f"t{index}", list(counts), tokens, train, [], test)


def test_task_quota_is_ratio_of_train_size_or_fixed():
    assert task_quota(200, 0.1, None) == 20
    assert task_quota(48, 0.1, None) == 5  # 4.8 rounds to 5
    assert task_quota(3, 0.1, None) == 1  # at least one when ratio > 0
    assert task_quota(200, 0.0, None) == 0
    assert task_quota(200, 0.1, 7) == 7  # per_task overrides ratio


def test_speaker_quotas_largest_remainder():
    # 7 × (5, 3, 2)/10 = 3.5, 2.1, 1.4 → floors 3, 2, 1 → the spare one goes to the largest remainder (a)
    assert speaker_quotas({"a": 5, "b": 3, "c": 2}, 7) == {"a": 4, "b": 2, "c": 1}
    # 5 × (½, ½) = 2.5 each → tie → the earlier speaker gets the spare one
    assert speaker_quotas({"Host": 24, "Guest": 24}, 5) == {"Host": 3, "Guest": 2}
    assert speaker_quotas({"a": 1, "b": 1}, 0) == {"a": 0, "b": 0}


def test_plan_draws_share_each_earlier_task_by_speaker():
    first, second = _task(0, {"Host": 20, "Guest": 10}), _task(1, {"Host": 6, "Other": 4})
    # 30 × 0.1 = 3 → 2 + 1;  10 × 0.1 = 1 → 0.6/0.4 → Host
    assert plan_draws([first, second], 0.1, None) == [
        Draw(0, "Host", "<HOST>", 2), Draw(0, "Guest", "<GUEST>", 1), Draw(1, "Host", "<HOST>", 1),
    ]
    # per_task 4: 2.67/1.33 → floors 2, 1 → the spare one to Host
    assert plan_draws([first], 0.1, 4) == [Draw(0, "Host", "<HOST>", 3), Draw(0, "Guest", "<GUEST>", 1)]
    assert plan_draws([first, second], 0.0, None) == []


def test_draw_seed_is_stable_and_distinct():
    draw = Draw(0, "Host", "<HOST>", 3)
    assert draw_seed(0, 2, draw) == draw_seed(0, 2, Draw(0, "Host", "<HOST>", 9))  # the count does not shift it
    assert len({draw_seed(0, 2, draw), draw_seed(1, 2, draw), draw_seed(0, 3, draw),
                draw_seed(0, 2, Draw(0, "Guest", "<G>", 3))}) == 4


def test_sampling_is_seeded(tiny_config):
    config = tiny_config("gen_replay")
    _, tasks, tokens = session.load_tasks(config)
    acc = session.make_accelerator("fp32")
    model, tokenizer, *_ = session.build_model(config, sorted(set(tokens.values())), acc)
    kwargs = {"max_new_tokens": 6, "temperature": 0.8, "top_p": 0.95, "batch_size": 4}
    first = sample_utterances(model, tokenizer, "<HOST>", 6, seed=3, **kwargs)
    assert len(first) == 6 and len(set(first)) > 1  # sampled, not greedy
    assert sample_utterances(model, tokenizer, "<HOST>", 6, seed=3, **kwargs) == first
    assert sample_utterances(model, tokenizer, "<HOST>", 6, seed=4, **kwargs) != first


def test_a_batch_of_prompts_decodes_each_as_if_alone(tiny_config):
    config = tiny_config("naive")
    _, tasks, tokens = session.load_tasks(config)
    model, tokenizer, *_ = session.build_model(config, sorted(set(tokens.values())), session.make_accelerator("fp32"))
    words = [tokenizer(w, add_special_tokens=False)["input_ids"][:1] for w in ("pizza", "quantum", "music", "so")]
    prompts = [[tokenizer.convert_tokens_to_ids(t)] + w for t in sorted(set(tokens.values())) for w in words]
    greedy = {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    batched = sample_continuations(model, tokenizer, prompts, batch_size=len(prompts), **greedy)
    alone = [sample_continuations(model, tokenizer, [p], batch_size=1, **greedy)[0] for p in prompts]
    assert batched == alone and len(set(alone)) > 1
    with pytest.raises(ValueError, match="different lengths"):
        sample_continuations(model, tokenizer, [[1], [1, 2]], batch_size=2, **greedy)


def test_stream_saves_samples_and_trains_on_them(tiny_config, captured):
    made: list[GenReplay] = captured
    config = tiny_config("gen_replay")
    metrics = pipeline.run_stream(config)
    strategy, run_dir = made[0], config.run_dir

    assert not (run_dir / "gen_replay" / "before_phase1.jsonl").exists()  # nothing earlier to replay
    rows = [json.loads(line) for line in (run_dir / "gen_replay" / "before_phase2.jsonl").read_text().splitlines()]
    # task 1 trains on 24 Host + 24 Guest A utterances: 0.1 × 48 → 5 → 3 Host, 2 Guest A (tie to Host)
    assert metrics.phases[1].strategy["dropped_empty"] == 0 and metrics.phases[1].strategy["kept"] == len(rows)
    assert "sampled" not in metrics.phases[0].strategy
    assert [(r["task"], r["speaker"]) for r in rows] == [("guest_a", "Host")] * 3 + [("guest_a", "Guest A")] * 2
    assert all(r["text"] and r["phase"] == 2 for r in rows)

    assert [(e.task, e.speaker, e.token, e.text) for e in strategy.pseudo] == [
        (r["task_index"], r["speaker"], r["token"], r["text"]) for r in rows]
    assert all(e.split is Split.TRAIN and e.line == GENERATED_LINE for e in strategy.pseudo)
    second = strategy.ctx.tasks[1]
    assert strategy.train_data(second) == second.train + strategy.pseudo
    assert metrics.phases[1].train_examples == len(second.train) + 5

