"""`adapters`: routing as pure functions, adapter bookkeeping on a tiny PEFT model, and an
end-to-end stream in which task 1's perplexity and weights must not move at all in phase 2."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from cltune.modeling.checkpoint import load_checkpoint
from cltune.strategies.adapters import (
    AdapterRouter,
    candidates,
    original_token_rows,
    speaker_routes,
    token_rows,
    using_adapter,
)
from cltune.strategies.routing import load_router
from cltune.studies.pipeline import run_stream
from cltune.training.session import build_session

from helpers import PPL_ONLY, logits_of


def adapter_params(model, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if adapter in n.split(".")}


def test_speaker_routes_list_every_task_with_that_speaker_in_stream_order():
    routes = speaker_routes([["<H>", "<A>"], ["<H>", "<B>"], ["<C>"]])
    assert routes == {"<H>": [0, 1], "<A>": [0], "<B>": [1], "<C>": [2]}


def test_the_mixture_nll_is_the_equal_prior_mixture_of_the_candidates():
    from cltune.evaluation.evaluate import mixture_nll

    nll = torch.tensor([[2.0, 10.0], [3.0, 1.0]])  # 2 candidates × 2 utterances
    expected = [-math.log((math.exp(-2.0) + math.exp(-3.0)) / 2), -math.log((math.exp(-10.0) + math.exp(-1.0)) / 2)]
    assert mixture_nll(nll).tolist() == pytest.approx(expected, rel=1e-12)
    assert mixture_nll(nll[:1]).tolist() == [2.0, 10.0]  # one candidate: its own NLL
    # never more than ln C worse than the best candidate, never better than it
    best = nll.min(dim=0).values.double()
    assert torch.all(mixture_nll(nll) <= best + math.log(2)) and torch.all(mixture_nll(nll) >= best)
    assert mixture_nll(torch.full((3, 1), 4.0)).item() == pytest.approx(4.0)  # equal candidates: the same NLL


def test_the_router_routes_by_task_or_speaker_and_survives_json(tiny_config):
    session = build_session(tiny_config("adapters"))
    model = session.model
    session.strategy.before_task(session.tasks[1])  # adds and activates task2
    router = AdapterRouter(model, ["default", "task2"], {"<HOST>": ["default", "task2"], "<GUEST_A>": ["default"]})
    again = AdapterRouter.from_json(router.to_json(), model)
    for r in (router, again):
        assert len(r.agnostic_choices("<HOST>")) == 2 and len(r.agnostic_choices("<GUEST_A>")) == 1
        with r.oracle(0):
            assert model.active_adapter == "default"
        with r.agnostic("<HOST>"):
            assert model.active_adapter == "task2"
        with r.agnostic("<GUEST_A>"):
            assert model.active_adapter == "default"
        with r.agnostic("<NOBODY>"):  # a speaker no task has: the model as it is
            assert model.active_adapter == "task2"
        assert model.active_adapter == "task2" and r.task_routed
    latest = AdapterRouter(model, ["default", "task2"], {"<HOST>": ["default", "task2"]}, likelihood=False)
    assert len(latest.agnostic_choices("<HOST>")) == 1
    # router.json written before shared speakers had candidates: one adapter per token, served as the latest
    old = AdapterRouter.from_json({"kind": "adapters", "tasks": ["default", "task2"], "routes": {"<HOST>": "task2"}},
                                  model)
    assert old.routes == {"<HOST>": ["task2"]} and not old.likelihood


def test_the_agnostic_row_reuses_what_the_oracle_row_scored_with_the_same_weights(tiny_config, monkeypatch):
    """A guest's own adapter scores its utterances in the oracle row and again as an agnostic candidate: with the
    memo it is scored once, the agnostic figures the same (to float rounding), fewer positions through the model."""
    import cltune.evaluation.evaluate as evaluate

    session = build_session(tiny_config("adapters", ["eval.attribution=true"]))
    ctx, model = session.ctx, session.model
    session.strategy.before_task(session.tasks[1])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.3 * torch.randn_like(p))
    router = AdapterRouter(model, ["default", "task2"], {"<HOST>": ["default", "task2"], "<GUEST_A>": ["default"],
                                                         "<GUEST_B>": ["task2"]})
    assert [name for name, _ in router.named_choices("<HOST>")] == ["default", "task2"]
    assert [name for name, _ in router.named_choices("<NOBODY>")] == [model.active_adapter] == ["task2"]
    assert router.oracle_name(1) == "task2"
    scored = []
    example_nll = evaluate.example_nll
    monkeypatch.setattr(evaluate, "example_nll", lambda acc, scorer, encoded, *a: scored.append(
        sum(map(len, encoded))) or example_nll(acc, scorer, encoded, *a))
    rows, positions = {}, {}
    for memo in (None, {}):
        evaluate.test_row(ctx, router, session.tasks, session.config.eval, memo=memo)
        scored.clear()
        rows[memo is None] = evaluate.test_row(ctx, router, session.tasks, session.config.eval, agnostic=True,
                                               memo=memo)
        positions[memo is None] = sum(scored)
    alone, shared = rows[True], rows[False]
    assert [s.ppl for s in shared] == pytest.approx([s.ppl for s in alone], rel=1e-6)
    assert [s.attribution for s in shared] == [s.attribution for s in alone]
    # with the memo only the host's variants under the other task's adapter are scored again: about a third
    assert 0 < positions[False] < positions[True] / 2


@pytest.mark.parametrize("warm_start", [False, True])
def test_before_task_adds_an_isolated_trainable_adapter(tiny_config, warm_start):
    config = tiny_config("adapters", [f"adapters.warm_start={str(warm_start).lower()}"])
    session = build_session(config)
    ctx, strategy = session.ctx, session.strategy
    with torch.no_grad():  # stand-in for phase 1 training, so a copy is distinguishable from a fresh adapter
        for p in ctx.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    default = adapter_params(ctx.model, "default")
    strategy.before_task(ctx.tasks[1])
    new = adapter_params(ctx.model, "task2")
    trainable = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
    assert trainable == set(new) and trainable  # only the new adapter trains
    renamed = {n.replace(".default", ".task2"): v for n, v in default.items()}
    if warm_start:
        assert all(torch.equal(new[n], v) for n, v in renamed.items())
    else:
        assert all(torch.count_nonzero(v) == 0 for n, v in new.items() if "lora_B" in n)  # LoRA starts as a no-op
        assert torch.equal(token_rows(ctx.model, "task2"), original_token_rows(ctx.model, "default"))
        assert not torch.equal(token_rows(ctx.model, "task2"), token_rows(ctx.model, "default"))


def test_using_adapter_restores_the_active_adapter_and_what_trains(tiny_config):
    config = tiny_config("adapters")
    session = build_session(config)
    ctx, strategy = session.ctx, session.strategy
    with torch.no_grad():  # stand-in for phase 1 training
        for p in ctx.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    strategy.before_task(ctx.tasks[1])
    before = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
    fresh = logits_of(ctx, ctx.tasks[1].test)  # a new adapter is a no-op: LoRA B = 0, base token rows
    with using_adapter(ctx.model, "default"):
        assert ctx.model.active_adapter == "default"
        assert not torch.allclose(logits_of(ctx, ctx.tasks[1].test), fresh)
    with using_adapter(ctx.model, None):  # the base model alone, token rows included
        assert torch.allclose(logits_of(ctx, ctx.tasks[1].test), fresh, atol=1e-6)  # same up to summation order
    assert ctx.model.active_adapter == "task2"
    assert {n for n, p in ctx.model.named_parameters() if p.requires_grad} == before


def test_an_unlearned_task_is_routed_by_its_speakers(tiny_config):
    config = tiny_config("adapters")
    session = build_session(config)
    ctx, strategy = session.ctx, session.strategy
    # before phase 2 only "default" exists; task 2 shares the host with task 1
    assert strategy.adapter_for_task(0) == "default"
    assert strategy.adapter_for_task(1) == "default"
    strategy.before_task(ctx.tasks[1])
    assert strategy.adapter_for_task(1) == "task2"


def test_stream_leaves_earlier_tasks_exactly_unchanged(tiny_config):
    config = tiny_config("adapters", PPL_ONLY)
    metrics = run_stream(config)
    ppl = metrics.ppl
    assert ppl[2][0] == ppl[1][0]  # bit-exact: task 1 still runs on its own, untouched adapter
    assert metrics.forgetting_pct == [0.0]
    assert ppl[2][1] < ppl[1][1] and math.isfinite(ppl[2][1])  # task 2's own adapter learned task 2

    phase1, phase2 = config.run_dir / "phase1", config.run_dir / "phase2"
    first, second = load_file(phase1 / "adapter_model.safetensors"), load_file(phase2 / "adapter_model.safetensors")
    assert first.keys() == second.keys() and any("trainable_tokens_delta" in k for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first)  # LoRA and token rows of task 1
    assert (phase2 / "task2" / "adapter_model.safetensors").exists()

    model, tokenizer, meta = load_checkpoint(phase2)
    assert meta["adapters"] == ["default", "task2"] and model.active_adapter == "task2"
    router = load_router(phase2, model)  # what `cltune generate` routes with
    assert router.to_json()["routes"] == {"<HOST>": ["default", "task2"], "<GUEST_A>": ["default"],
                                          "<GUEST_B>": ["task2"]}
    assert router.to_json()["shared_speakers"] == "likelihood"
    assert router.to_json()["tasks"] == ["default", "task2"]


def test_agnostic_rows_route_each_utterance_by_its_speaker(strategy_streams):
    """Oracle rows give each task its own adapter; agnostic rows give each test utterance the adapters its
    speaker token routes to — after phase 2 task 1's host turns are scored by the equal-prior mixture of
    both adapters (the host is in both tasks), Guest A's by task 1's adapter alone."""
    from cltune.api import make_config
    from cltune.evaluation.evaluate import example_nll
    from cltune.modeling.batching import encode
    from cltune.modeling.scoring import TokenScorer
    from cltune.training.session import load_tasks, make_accelerator

    raw, metrics = strategy_streams("adapters")
    assert metrics.routing == "oracle" and len(metrics.agnostic.ppl) == 3
    assert metrics.agnostic.ppl[1] == pytest.approx(metrics.ppl[1], rel=1e-6)  # one adapter so far: no difference
    assert metrics.forgetting_pct == [0.0] and metrics.agnostic.forgetting_pct[0] != 0.0

    model, tokenizer, _ = load_checkpoint(f"{raw['output_dir']}/{raw['name']}/phase2")
    task1 = load_tasks(make_config(raw))[1][0]
    acc, scorer, total, count = make_accelerator("fp32"), TokenScorer(model), 0.0, 0.0
    for adapters, speaker in ((("default", "task2"), "Host"), (("default",), "Guest A")):
        likelihoods = []
        for adapter in adapters:
            with using_adapter(model, adapter):
                sums, counts = example_nll(acc, scorer, encode([e for e in task1.test if e.speaker == speaker],
                                                               tokenizer, raw["data"]["max_length"]),
                                           tokenizer.pad_token_id)
            likelihoods.append(torch.exp(-sums.double()))
        mixture = -torch.log(sum(likelihoods) / len(likelihoods))  # computed here without logsumexp
        total, count = total + mixture.sum().item(), count + counts.sum().item()
    assert metrics.agnostic.ppl[2][0] == pytest.approx(math.exp(total / count), rel=1e-6)
    assert metrics.agnostic.ppl[2][0] != pytest.approx(metrics.ppl[2][0], rel=1e-6)
    from cltune.report import write_report

    report = write_report(f"{raw['output_dir']}/{raw['name']}")[0].read_text()
    assert "matrix (oracle task id)" in report and f"{metrics.agnostic.ppl[2][0]:.2f}" in report


def test_a_strategy_without_task_routing_reports_one_matrix(strategy_streams):
    _, metrics = strategy_streams("merge")
    assert metrics.routing == "single" and metrics.agnostic is None


def test_max_candidates_bounds_a_speakers_mixture_to_its_latest_own_and_the_newest():
    """Six tasks learned, a host in all of them and a guest in the second: unbounded, the mixture grows with the
    stream; bounded, it is the speaker's last own task and the newest others, in stream order, never more."""
    learned = range(6)
    assert candidates([0, 1, 2, 3, 4, 5], learned) == [0, 1, 2, 3, 4, 5]
    assert candidates([1], learned) == [1, 2, 3, 4, 5]
    assert candidates([0, 1, 2, 3, 4, 5], learned, 2) == [4, 5]
    assert candidates([1], learned, 2) == [1, 5] and candidates([1], learned, 3) == [1, 4, 5]
    assert candidates([1, 3], learned, 1) == [3] and candidates([1, 3], range(2), 2) == [1, 3]
    assert candidates([5], learned, 2) == [5]  # the newest task's own speaker: nothing later to add
    for most in range(1, 7):
        for own in ([0], [2], [0, 3], [0, 1, 2, 3, 4, 5]):
            chosen = candidates(own, learned, most)
            assert own[-1] in chosen and len(chosen) <= most and chosen == sorted(set(chosen))


@pytest.mark.parametrize("strategy", ["adapters", "progressive"])
def test_later_adapters_join_each_speakers_mixture(tiny_config, strategy):
    session = build_session(tiny_config(strategy, [f"{strategy}.later_adapters=true"]))
    session.strategy.before_task(session.tasks[1])  # two tasks learned (as far as routing goes)
    routes = session.strategy.router().routes
    assert routes == {"<HOST>": ["default", "task2"], "<GUEST_A>": ["default", "task2"], "<GUEST_B>": ["task2"]}
    plain = build_session(tiny_config(strategy, [f"{strategy}.later_adapters=false"]))
    plain.strategy.before_task(plain.tasks[1])
    assert plain.strategy.router().routes["<GUEST_A>"] == ["default"]
    latest = build_session(tiny_config(strategy, [f"{strategy}.later_adapters=true",
                                                  f"{strategy}.shared_speakers=latest"]))
    latest.strategy.before_task(latest.tasks[1])
    assert latest.strategy.router().routes["<GUEST_A>"] == ["default"]  # later adapters only join a likelihood mixture
    bounded = build_session(tiny_config(strategy, [f"{strategy}.later_adapters=true", f"{strategy}.max_candidates=1"]))
    bounded.strategy.before_task(bounded.tasks[1])
    assert bounded.strategy.router().routes == {"<HOST>": ["task2"], "<GUEST_A>": ["default"], "<GUEST_B>": ["task2"]}


@pytest.mark.parametrize("strategy", ["adapters", "progressive"])
def test_metrics_record_the_memory_of_each_column(strategy_streams, strategy):
    """Each phase of a per-task strategy records its newest column's parameters (adapter, token rows and, for
    progressive, its lateral gains), all columns' and their bytes (fp32): the total matches the adapter count the
    run reports at the end, plus progressive's gains, which only later columns have."""
    _, metrics = strategy_streams(strategy)
    first, second = (p.strategy for p in metrics.phases)
    assert (first["columns"], second["columns"]) == (1, 2)
    assert first["all_columns_parameters"] == first["column_parameters"] > 0
    assert second["all_columns_parameters"] == first["column_parameters"] + second["column_parameters"]
    gains = second["column_parameters"] - first["column_parameters"]  # same LoRA shapes: the rest is gains
    assert second["all_columns_parameters"] == metrics.adapter_params + gains
    assert (gains > 0) == (strategy == "progressive")
    assert second["all_columns_bytes"] == 4 * second["all_columns_parameters"]
