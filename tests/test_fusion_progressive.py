"""`fusion` and `progressive`: adapters mixed inside each layer (`AdapterMix`: one low-rank product, equal to PEFT
running each adapter with its weight), phases that start where the last one ended, earlier tasks' weights
untouched, and checkpoints that `cltune generate` serves as the run did."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file

from cltune.api import make_config
from cltune.evaluation.evaluate import example_nll, perplexity
from cltune.modeling.checkpoint import load_checkpoint
from cltune.modeling.scoring import TokenScorer
from cltune.strategies import adapters as adapters_module
from cltune.strategies.adapters import token_rows, using_adapter
from cltune.strategies.mixing import AdapterMix, lora_layers, trainability_kept
from cltune.strategies.routing import load_router
from cltune.studies.pipeline import run_stream
from cltune.training.session import build_session, load_tasks, make_accelerator

from helpers import PPL_ONLY, logits_of, tiny_run_config, write_dialogue


def stand_in_for_training(model) -> None:
    """Random updates of what trains, so that copies and fresh adapters are told apart."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


class PeftMix:
    """The reference `AdapterMix` is tested against: PEFT runs every adapter of the list in every LoRA layer (its
    own dropout, products and sum each), and a hook on each adapter's B multiplies its output by its weight."""

    def __init__(self, model, adapters, scales):
        self.model, self.previous, self.weights, self.hooks = model, model.active_adapter, {}, []
        with trainability_kept(model):
            model.set_adapter(adapters[-1])
            for index, layer in enumerate(lora_layers(model)):
                layer.set_adapter(list(adapters))
                self.hooks.append(layer.register_forward_pre_hook(
                    lambda module, args, index=index: self.weights.__setitem__(index, scales(index, args[0]))))
                for position, name in enumerate(adapters):
                    self.hooks.append(layer.lora_B[name].register_forward_hook(
                        lambda module, args, out, index=index, position=position: out if (
                            w := self.weights[index][position]) is None else out * w.to(out.dtype)))

    def remove(self):
        for hook in self.hooks:
            hook.remove()
        with trainability_kept(self.model):
            self.model.set_adapter(self.previous)


def logits_and_grads(ctx, examples, tensors):
    """Logits of `examples` with a graph, and the gradients of `tensors` of a loss on them."""
    for t in tensors:
        t.grad = None
    logits = logits_of(ctx, examples, grad=True)
    logits.float().pow(2).mean().backward()
    return logits.detach(), [t.grad.clone() for t in tensors]


def same_function(ctx, examples, tensors, first, second) -> None:
    """`first` and `second` (each installs a mix and returns it) give the same logits and the same gradients."""
    results = []
    for install in (first, second):
        mix = install()
        results.append(logits_and_grads(ctx, examples, tensors))
        mix.remove()
    (a, a_grads), (b, b_grads) = results
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-3) and a.abs().max() > 1
    assert all((x - y).abs().max() <= 1e-3 * y.abs().max() and y.abs().sum() > 0 for x, y in zip(a_grads, b_grads))


def test_a_mix_of_per_channel_or_per_token_weights_is_the_function_peft_computes_adapter_by_adapter(tiny_config):
    """One low-rank product gives the logits and gradients of PEFT running each adapter with its weight: per
    output channel (progressive's gains), per token (fusion's gate), a number, or none."""
    session = build_session(tiny_config("adapters"))
    ctx, model = session.ctx, session.model
    stand_in_for_training(model)
    session.strategy.before_task(ctx.tasks[1])
    stand_in_for_training(model)
    model.eval()  # no dropout: PEFT draws one per adapter, the mix one for all
    torch.manual_seed(1)
    layers = lora_layers(model)
    channel = [torch.rand(layer.out_features, requires_grad=True) for layer in layers]
    gate = [torch.randn(layer.in_features, requires_grad=True) for layer in layers]

    def token(index, x):  # a weight per token read off the layer's input, as fusion's gate does
        return torch.sigmoid(x.float() @ gate[index])[..., None]

    trained = [p for n, p in model.named_parameters() if ".task2." in n and "lora_" in n]
    weightings = [(lambda i, x: [channel[i], None], channel),  # progressive's
                  (lambda i, x: [token(i, x), 1 - token(i, x)], gate),  # fusion's
                  (lambda i, x: [token(i, x), channel[i]], gate + channel),
                  (lambda i, x: [torch.tensor(0.3), None], [])]
    for scales, weights in weightings:
        same_function(ctx, ctx.tasks[1].test[:4], [*weights, *trained],
                      lambda scales=scales: AdapterMix(model, ["default", "task2"], scales),
                      lambda scales=scales: PeftMix(model, ["default", "task2"], scales))


def test_a_mix_weights_each_adapter_inside_every_layer_and_comes_off_cleanly(tiny_config):
    session = build_session(tiny_config("adapters"))
    ctx, model = session.ctx, session.model
    stand_in_for_training(model)
    session.strategy.before_task(ctx.tasks[1])  # adds task2 (B = 0) and trains it
    stand_in_for_training(model)
    examples = ctx.tasks[1].test[:4]
    alone, before, trains = logits_of(ctx, examples), model.active_adapter, trainable(model)
    with using_adapter(model, "default"):
        default_alone = logits_of(ctx, examples)

    with using_adapter(model, None):
        base = logits_of(ctx, examples)

    zero = torch.zeros(())
    mix = AdapterMix(model, ["default", "task2"], lambda layer, x: [zero, None])  # default's update weighted 0
    assert torch.allclose(logits_of(ctx, examples), alone, atol=1e-6)
    with using_adapter(model, None):  # adapters disabled: the mix steps aside too
        assert torch.equal(logits_of(ctx, examples), base)
    with pytest.raises(RuntimeError, match="remove the mix before switching adapters"), using_adapter(model, "task2"):
        logits_of(ctx, examples)
    assert trainable(model) == trains  # PEFT's per-layer set_adapter flips trainability; the mix keeps it
    mix.remove()
    both = AdapterMix(model, ["default", "task2"], lambda layer, x: [None, None])
    summed = logits_of(ctx, examples)
    assert not torch.allclose(summed, alone, atol=1e-3) and not torch.allclose(summed, default_alone, atol=1e-3)
    both.remove()
    assert torch.equal(logits_of(ctx, examples), alone)  # hooks and per-layer adapters gone
    assert model.active_adapter == before and trainable(model) == trains


def test_fusion_starts_phase_2_where_phase_1_ended_and_trains_only_the_new_adapter_and_gate(tiny_config):
    session = build_session(tiny_config("fusion"))
    ctx, model, strategy = session.ctx, session.model, session.strategy
    assert not any(p.requires_grad for p in strategy.gate.parameters())  # phase 1: one adapter, no gate
    stand_in_for_training(model)
    examples = ctx.tasks[0].test[:4] + ctx.tasks[1].test[:4]
    end_of_phase_1 = logits_of(ctx, examples)
    strategy.before_task(ctx.tasks[1])
    # two half-weighted copies: equal up to float32 rounding through the layers (seen ≤ 1.3e-4 on logits up to ~10)
    assert torch.allclose(logits_of(ctx, examples), end_of_phase_1, atol=1e-3)
    assert trainable(model) == {n for n in dict(model.named_parameters()) if "task2" in n.split(".")}
    assert all(p.requires_grad for p in strategy.gate.parameters())
    bias = strategy.gate.proj[0].bias
    assert bias[:2].tolist() == pytest.approx([-math.log(2)] * 2) and bias[2:].abs().sum() == 0
    # once the new adapter differs from its copy, the gate's input weights move the output
    stand_in_for_training(model)
    uniform = logits_of(ctx, examples)
    with torch.no_grad():
        for layer in strategy.gate.proj:
            layer.weight[1].normal_()
    assert not torch.allclose(logits_of(ctx, examples), uniform, atol=1e-3)


def test_fusion_keeps_earlier_weights_and_its_checkpoint_serves_as_the_run_did(tiny_config):
    config = tiny_config("fusion", PPL_ONLY)
    metrics = run_stream(config)
    assert metrics.routing == "single" and metrics.agnostic is None  # no task id, no speaker routing
    assert math.isfinite(metrics.ppl[2][1]) and metrics.ppl[2][1] < metrics.ppl[1][1]
    phase1, phase2 = config.run_dir / "phase1", config.run_dir / "phase2"
    first, second = load_file(phase1 / "adapter_model.safetensors"), load_file(phase2 / "adapter_model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)  # task 1's adapter and rows never moved
    state = load_file(phase2 / "strategy_state.safetensors")
    assert any(k.startswith("module.gate.proj.") for k in state)

    model, tokenizer, _ = load_checkpoint(phase2)
    new_rows, old_rows = token_rows(model, "task2"), token_rows(model, "default")
    indices = model.get_base_model().get_input_embeddings().token_adapter.token_indices["task2"]
    for position, token_id in enumerate(indices):
        same = torch.equal(new_rows[position], old_rows[position])
        assert same == (tokenizer.convert_ids_to_tokens(token_id) != "<GUEST_B>")  # only the new speaker's row trained
    router = load_router(phase2, model)  # reinstalls the gate: `cltune generate` serves the fused model
    assert router.to_json()["kind"] == "fusion"
    tasks = load_tasks(config)[1]
    acc, scorer = make_accelerator("fp32"), TokenScorer(model)
    for k, task in enumerate(tasks):
        ppl = perplexity(acc, scorer, tokenizer, task.test, config.data.max_length)
        assert ppl == pytest.approx(metrics.ppl[2][k], rel=1e-5)


@pytest.mark.parametrize("new_column", ["fresh", "copy"])
def test_progressive_column_2_starts_as_column_1_and_never_changes_it(tiny_config, new_column):
    session = build_session(tiny_config("progressive", [f"progressive.new_column={new_column}"]))
    ctx, model, strategy = session.ctx, session.model, session.strategy
    stand_in_for_training(model)
    examples = ctx.tasks[1].test[:4]
    column_1 = logits_of(ctx, examples)
    strategy.before_task(ctx.tasks[1])
    copied = [torch.equal(p, dict(model.named_parameters())[n.replace("task2", "default")])
              for n, p in model.named_parameters() if "task2" in n.split(".") and "lora_B" in n]
    assert all(copied) == (new_column == "copy")  # a copy of adapter 1, or a fresh LoRA (B = 0)
    assert strategy.laterals.columns[1][0][0].unique().tolist() == [0.0 if new_column == "copy" else 1.0]
    router = strategy.router()
    with router.oracle(1):
        # fresh: B = 0 and gain 1 on adapter 1; copy: adapter 2 = adapter 1 and gain 0 on it (rounding only)
        assert torch.allclose(logits_of(ctx, examples), column_1, atol=1e-5)
    expected = {n for n in dict(model.named_parameters()) if "task2" in n.split(".")}
    assert trainable(model) == expected
    assert ([p.requires_grad for p in strategy.laterals.parameters()]
            == [True] * len(list(strategy.laterals.parameters())))
    stand_in_for_training(model)  # the new column's adapter
    with torch.no_grad():
        for gains in strategy.laterals.columns[1]:
            gains.add_(torch.rand_like(gains))
    with router.oracle(0):
        assert torch.allclose(logits_of(ctx, examples), column_1, atol=1e-6)  # column 1 is the frozen past
    with router.oracle(1):
        assert not torch.allclose(logits_of(ctx, examples), column_1, atol=1e-3)
    assert strategy.columns.current == 1 and trainable(model) == expected  # switching back restores both


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_progressive_validated_routes_send_each_speaker_to_its_best_candidate_on_validation(tiny_config, monkeypatch,
                                                                                             precision):
    """After a phase, every speaker is routed to whichever of its candidate columns (its own, the newest) alone or
    their equal-prior mixture has the lowest NLL on its utterances in the learned tasks' validation splits, scored
    in the run's arithmetic (a bf16 base is not upcast as evaluation's is); the choice survives a checkpoint
    (`state`) and is what the router serves and saves."""
    session = build_session(tiny_config("progressive", [f"model.precision={precision}"]))
    ctx, model, strategy = session.ctx, session.model, session.strategy
    stand_in_for_training(model)
    strategy.after_task(ctx.tasks[0])
    strategy.before_task(ctx.tasks[1])
    stand_in_for_training(model)
    with torch.no_grad():
        for gains in strategy.laterals.columns[1]:
            gains.add_(torch.rand_like(gains) - 0.5)
    strategy.chosen = {}  # what phase 1 chose aside: every speaker's candidates
    candidates = strategy.router().routes
    assert candidates["<GUEST_A>"] == ["default", "task2"] and candidates["<GUEST_B>"] == ["task2"]
    base_weight = model.get_base_model().model.layers[0].mlp.up_proj.weight
    seen = []
    hook = ctx.scorer.register_forward_pre_hook(lambda module, args: seen.append(base_weight.dtype))
    costs = strategy.after_task(ctx.tasks[1])
    hook.remove()
    run_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen and set(seen) == {run_dtype}  # the run's arithmetic, not evaluation's
    router = strategy.router()
    best, gaps = {}, []
    for token, names in candidates.items():
        examples = [e for task in ctx.tasks for e in task.val if e.token == token]
        assert examples
        each, encoded = [], ctx.encode(examples)
        for name in names:
            with router.serve(name):
                each.append(example_nll(ctx.accelerator, ctx.scorer, encoded, ctx.tokenizer.pad_token_id,
                                        fp32=False)[0])
        options = {(name,): float(nll.sum()) for name, nll in zip(names, each)}
        options[tuple(names)] = float((-(torch.stack(each).neg().logsumexp(0) - math.log(len(names)))).sum())
        best[token] = list(min(options, key=options.get))
        gaps.append(max(options.values()) / min(options.values()))
    assert max(gaps) > 1.01  # the options differ, so the choice is one
    assert router.routes == best
    assert router.to_json()["shared_speakers"] == "validated"
    own_latest = {"<HOST>": ["task2"], "<GUEST_A>": ["default"], "<GUEST_B>": ["task2"]}
    assert costs["speakers_on_later_columns"] == sum(len(best[t]) == 1 and best[t] != own
                                                    for t, own in own_latest.items())
    assert costs["speakers_on_mixtures"] == sum(len(route) == 2 for route in best.values())
    column_of_print = {router.weights_fingerprint(name): name for name in ("default", "task2")}
    restored = type(strategy)(ctx, strategy.settings)
    restored.load_full_state(strategy.full_state())
    assert restored.router().routes == router.routes
    # columns never change after their phase: each (column, task) pair is scored once, and choosing again scores none
    assert {(column_of_print[p], task) for p, task in strategy._validation_nll} == {
        ("default", 0), ("default", 1), ("task2", 0), ("task2", 1)}
    monkeypatch.setattr(adapters_module, "example_nll", lambda *args, **kwargs: pytest.fail("scored again"))
    strategy.validate_routes()
    assert strategy.router().routes == router.routes


@pytest.mark.parametrize(("first", "second", "route"), [
    ([1.0, 1.0, 1.0], [5.0, 5.0, 5.0], ["default"]),  # one column is better on every utterance
    ([6.0, 6.0, 6.0], [2.0, 3.0, 2.0], ["task2"]),
    ([1.0, 9.0, 1.0], [9.0, 1.0, 9.0], ["default", "task2"]),  # each better on some: the mixture is far lower
])
def test_a_validated_route_is_the_lowest_of_each_candidate_and_their_mixture(monkeypatch, first, second, route):
    from types import SimpleNamespace

    served = []
    per_name = {"default": torch.tensor(first + [0.5], dtype=torch.double),  # the last: another speaker's
                "task2": torch.tensor(second + [0.5], dtype=torch.double)}

    @contextmanager
    def serve(name):
        served.append(name)
        yield

    monkeypatch.setattr(adapters_module, "example_nll", lambda *args, **kwargs: (per_name[served[-1]], None))
    task = SimpleNamespace(index=0, val=[SimpleNamespace(token=t) for t in ("<A>", "<A>", "<A>", "<B>")])
    ctx = SimpleNamespace(scorer=torch.nn.Identity(), encode=lambda examples: examples, accelerator=None,
                          tokenizer=SimpleNamespace(pad_token_id=0), eval_batch_size=8)
    router = SimpleNamespace(routes={"<A>": ["default", "task2"], "<B>": ["task2"]}, serve=serve,
                             weights_fingerprint=lambda name: f"print-{name}")
    assert adapters_module.validated_routes(ctx, router, [task]) == {"<A>": route, "<B>": ["task2"]}
    assert served == ["default", "task2"]  # one scoring of the split per candidate; <B> has one candidate


def scored_utterances(monkeypatch) -> list[int]:
    """A list that grows by the number of utterances of every call of evaluation's scorer from now on."""
    from cltune.evaluation import evaluate as evaluation

    real, scored = evaluation.example_nll, []

    def counting(accelerator, scorer, encoded, *args, **kwargs):
        scored.append(len(encoded))
        return real(accelerator, scorer, encoded, *args, **kwargs)

    monkeypatch.setattr(evaluation, "example_nll", counting)
    return scored


def test_later_matrix_rows_reuse_what_frozen_columns_scored_with_the_same_figures(tiny_config, monkeypatch, tmp_path):
    """Column 1 is frozen after phase 1, so the row after phase 2 takes its scores of guest A's test split from the
    row before (with attribution: every speaker-token variant) and scores fewer utterances; every figure of both
    matrices and every per-utterance NLL is what scoring again gives, bit for bit."""
    from cltune.strategies.progressive import ProgressiveRouter

    scored = scored_utterances(monkeypatch)
    runs = {}
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr(ProgressiveRouter, "weights_fingerprint", lambda self, name: None)
        scored.clear()
        config = tiny_config("progressive", ["eval.samples_per_speaker=0", f"output_dir={tmp_path / str(reuse)}"])
        runs[reuse] = (run_stream(config), sum(scored), (config.run_dir / "test_nll.json").read_text())
    (kept, kept_scored, kept_nll), (again, again_scored, again_nll) = runs[True], runs[False]
    assert kept.ppl == again.ppl and kept.agnostic.ppl == again.agnostic.ppl and kept_nll == again_nll
    assert kept.speaker_attribution == again.speaker_attribution
    guest_a = 2 * len(load_tasks(config)[1][0].test)  # guest A's test utterances, each under two speaker tokens
    assert again_scored - kept_scored == guest_a > 0


@pytest.mark.parametrize("strategy", ["progressive", "adapters"])
def test_a_phase_starting_from_a_copy_reuses_the_last_rows_figure_of_the_copied_weights(tiny_config, monkeypatch,
                                                                                          tmp_path, strategy):
    """Guest B's phase starts from a copy of the weights that served guest B in the row before (column 1; adapters
    with warm_start: adapter 1): its start test PPL is that row's figure, not a second scoring of guest B's test
    split; what scoring again gives agrees to float rounding (the copied column adds a zero-gain block)."""
    from cltune.strategies.adapters import Adapters
    from cltune.strategies.base import Strategy
    from cltune.strategies.progressive import Progressive

    scored = scored_utterances(monkeypatch)
    sets = ["eval.samples_per_speaker=0", "eval.attribution=false", "adapters.warm_start=true"]
    runs = {}
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr({"progressive": Progressive, "adapters": Adapters}[strategy], "starts_as",
                                Strategy.starts_as)
        scored.clear()
        config = tiny_config(strategy, [*sets, f"output_dir={tmp_path / str(reuse)}"])
        runs[reuse] = (run_stream(config), sum(scored))
    (kept, kept_scored), (again, again_scored) = runs[True], runs[False]
    before = [p.before["test_ppl"] for p in kept.phases], [p.before["test_ppl"] for p in again.phases]
    assert before[0][1] == kept.ppl[1][1]  # phase 2 starts from the figure of row 1 (after phase 1)
    assert before[0][1] == pytest.approx(before[1][1], rel=1e-5)
    assert sum(kept.ppl, []) == pytest.approx(sum(again.ppl, []), rel=1e-5)  # the matrix: the same training
    assert again_scored - kept_scored == len(load_tasks(config)[1][1].test) > 0  # guest B's test split, once


def test_before_training_a_speaker_no_task_has_reuses_what_column_1_scored(tiny_config, monkeypatch, tmp_path):
    """Row 0: no column is installed yet and the model at rest is task 1's adapter alone — column 1 — so guest B's
    own speaker token, which no task has yet, takes column 1's scores of the oracle row instead of a second scoring
    of guest B's test split; every figure is what scoring again gives, bit for bit."""
    from cltune.strategies.progressive import ProgressiveRouter

    scored = scored_utterances(monkeypatch)
    unnamed = ProgressiveRouter.at_rest
    runs = {}
    for reuse in (True, False):
        if not reuse:  # as before: the adapter alone at rest had no column's name, so nothing matched it
            monkeypatch.setattr(ProgressiveRouter, "at_rest",
                                lambda self: None if self.columns.current is None else unnamed(self))
        scored.clear()
        config = tiny_config("progressive", ["eval.samples_per_speaker=0", f"output_dir={tmp_path / str(reuse)}"])
        runs[reuse] = (run_stream(config), sum(scored), (config.run_dir / "test_nll.json").read_text())
    (kept, kept_scored, kept_nll), (again, again_scored, again_nll) = runs[True], runs[False]
    assert kept.ppl == again.ppl and kept.agnostic.ppl == again.agnostic.ppl and kept_nll == again_nll
    assert kept.agnostic.speaker_attribution == again.agnostic.speaker_attribution
    assert kept.agnostic.ppl[0] == kept.ppl[0]  # before training, routing by speaker is routing by task
    assert again_scored - kept_scored == len(load_tasks(config)[1][1].test) > 0  # guest B's own-token variants


def test_a_task_not_learned_yet_is_served_by_the_newest_column(tiny_model_dir, two_tasks, tmp_path, monkeypatch):
    """Guest B's file with a host of its own shares no speaker with task 1; task 3 shares the host with task 1 only.
    Before its phase each is served by the newest column, the model at rest: what its speakers' tokens route to when
    no column knows them, what naive's one model is there, and the column its phase starts as. So its figure is the
    routed row's and naive's (forward transfer reads alike), it is scored once a row, and each phase starts from
    the last row's figure. Served by the base model (task 2) or column 1 (task 3), each was scored again."""
    caller_b = two_tasks[1].with_name("caller_b.csv")
    caller_b.write_text(two_tasks[1].read_text(encoding="utf-8").replace("Host,", "Caller,"), encoding="utf-8")
    stream = [two_tasks[0], caller_b, write_dialogue(tmp_path / "guest_a_again.csv", "Guest A", 40, 3)]
    scored = scored_utterances(monkeypatch)
    runs = {}
    for strategy in ("naive", "progressive"):
        scored.clear()
        config = make_config(tiny_run_config(tiny_model_dir, stream, tmp_path / strategy, strategy),
                             ["eval.samples_per_speaker=0"])
        runs[strategy] = (run_stream(config), sum(scored))
    (naive, naive_scored), (progressive, progressive_scored) = runs["naive"], runs["progressive"]
    tasks = load_tasks(config)[1]
    assert "Host" not in tasks[1].tokens and "Host" in tasks[2].tokens
    assert progressive.ppl[1][1] == progressive.agnostic.ppl[1][1]  # one function, one scoring
    assert progressive.ppl[1][1] == pytest.approx(naive.ppl[1][1], rel=1e-5)  # column 1 is naive's phase-1 model
    assert progressive.ppl[1][1] != pytest.approx(progressive.ppl[0][1], rel=1e-3)  # not the untrained model
    assert [p.before["test_ppl"] for p in progressive.phases[1:]] == [progressive.ppl[1][1], progressive.ppl[2][2]]
    assert progressive_scored <= naive_scored  # no scoring naive does not do (naive scores every task every row)


def test_progressive_without_lateral_gains_trains_the_copied_adapter_alone(tiny_config):
    """`lateral_gains: false`: the gains keep their start values (0 on every earlier adapter with `copy`), so
    column 2 trains exactly what continuing one adapter would — its adapter — and computes that adapter alone."""
    from cltune.training.loop import _trained

    session = build_session(tiny_config("progressive", ["progressive.lateral_gains=false"]))
    ctx, model, strategy = session.ctx, session.model, session.strategy
    stand_in_for_training(model)
    strategy.before_task(ctx.tasks[1])
    assert set(_trained(model, strategy)) == {n for n in dict(model.named_parameters()) if "task2" in n.split(".")}
    assert all(float(g.abs().max()) == 0.0 for g in strategy.laterals.columns[1])
    stand_in_for_training(model)  # the new adapter moves; the gains cannot
    column = logits_of(ctx, ctx.tasks[1].test[:4])
    strategy.columns.use(None)
    with using_adapter(model, "task2"):
        assert torch.allclose(logits_of(ctx, ctx.tasks[1].test[:4]), column, atol=1e-5)


def test_progressive_laterals_are_one_low_rank_product_equal_to_the_mix_of_every_adapter(tiny_config):
    """A column (its own adapter and the earlier ones stacked in one product, PEFT running none) gives the logits
    and the gradients of the gains and of its own adapter of PEFT running every adapter with its gain, to float
    rounding."""
    session = build_session(tiny_config("progressive"))
    ctx, model, strategy = session.ctx, session.model, session.strategy
    stand_in_for_training(model)
    strategy.before_task(ctx.tasks[1])
    stand_in_for_training(model)
    gains = strategy.laterals.columns[1]
    with torch.no_grad():
        for g in gains:
            g.copy_(torch.rand_like(g) * 2 - 0.5)
    batch = ctx.tasks[1].test[:4]

    def logits_and_gain_grads():
        model.zero_grad(set_to_none=True)
        strategy.laterals.zero_grad(set_to_none=True)  # the gains are the strategy's, not the model's
        logits = logits_of(ctx, batch, grad=True)
        logits.float().pow(2).mean().backward()
        own = [p.grad.clone() for n, p in model.named_parameters() if ".task2." in n and "lora_" in n]
        return logits.detach(), [g.grad.clone() for g in gains] + own

    fused, fused_grads = logits_and_gain_grads()
    strategy.columns.use(None)
    mix = PeftMix(model, ["default", "task2"], lambda layer, x: [gains[layer][0], None])
    mixed, mixed_grads = logits_and_gain_grads()
    mix.remove()
    assert torch.allclose(fused, mixed, rtol=1e-4, atol=1e-3) and fused.abs().max() > 1  # logits up to 16 here
    assert all((a - b).abs().max() <= 1e-3 * b.abs().max() for a, b in zip(fused_grads, mixed_grads))
    assert len(fused_grads) == len(gains) + 2 * len(gains) and all(a.abs().sum() > 0 for a in fused_grads)


def test_progressive_stream_forgets_nothing_by_task_id_and_its_checkpoint_routes_the_same(tiny_config):
    config = tiny_config("progressive", PPL_ONLY)
    metrics = run_stream(config)
    assert metrics.routing == "oracle" and metrics.ppl[2][0] == metrics.ppl[1][0] and metrics.forgetting_pct == [0.0]
    phase2 = config.run_dir / "phase2"
    model, tokenizer, _ = load_checkpoint(phase2)
    router = load_router(phase2, model)
    assert router.to_json()["kind"] == "progressive" and router.to_json()["at_rest"] == 1
    assert router.at_rest() == "task2"  # the column installed names the weights an unknown speaker gets
    router.columns.use(None)
    assert router.at_rest() is None and router.named_choices("<NOBODY>")[0][0] is None
    router.columns.use(1)
    tasks = load_tasks(config)[1]
    acc, scorer = make_accelerator("fp32"), TokenScorer(model)
    for k, task in enumerate(tasks):
        with router.oracle(k):
            assert perplexity(acc, scorer, tokenizer, task.test, config.data.max_length) == pytest.approx(
                metrics.ppl[2][k], rel=1e-5)


def test_sample_token_is_greedy_at_zero_and_keeps_only_the_top_p_mass():
    from cltune.modeling.generate import sample_token

    log_probs = torch.tensor([0.5, 0.3, 0.2]).log()
    generator = torch.Generator().manual_seed(0)
    assert sample_token(log_probs, 0.0, 0.9, generator) == 0
    drawn = {sample_token(log_probs, 1.0, 0.7, generator) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.7: the third token is cut
    assert {sample_token(log_probs, 1.0, 0.01, generator) for _ in range(50)} == {0}


def test_mixture_generation_draws_from_the_equal_prior_mixture(tiny_config):
    from contextlib import nullcontext

    from cltune.modeling.generate import generate_mixture, generate_text

    session = build_session(tiny_config("adapters"))
    ctx, model = session.ctx, session.model
    stand_in_for_training(model)
    session.strategy.before_task(ctx.tasks[1])
    stand_in_for_training(model)
    tokenizer, host = ctx.tokenizer, "<HOST>"
    ids = [tokenizer.convert_tokens_to_ids(host)]
    # one candidate, greedy: the same text as the library's generate
    alone = generate_mixture(model, tokenizer, lambda: [nullcontext()], ids, max_new_tokens=6, temperature=0)
    assert alone == generate_text(model, tokenizer, host, max_new_tokens=6, temperature=0)
    # two candidates, greedy: the next token is the argmax of π_1 p_default + π_2 p_task2, π ∝ each one's likelihood
    # of the prompt; a prompt on which the two candidates disagree is chosen so that the mixture decides
    model.eval()
    for example in ctx.tasks[0].test:
        prompt = ids + tokenizer(example.text, add_special_tokens=False)["input_ids"][:2]
        log_probs = []
        for adapter in ("default", "task2"):
            with using_adapter(model, adapter), torch.no_grad():
                log_probs.append(model(input_ids=torch.tensor([prompt])).logits[0].float().log_softmax(-1))
        if int(log_probs[0][-1].argmax()) != int(log_probs[1][-1].argmax()):
            break
    else:
        pytest.fail("no prompt on which the two adapters disagree")
    seen = torch.tensor(prompt[1:])
    prior = torch.stack([lp[:-1].gather(-1, seen[:, None]).sum() for lp in log_probs]).softmax(0)
    expected = int((prior[0] * log_probs[0][-1].exp() + prior[1] * log_probs[1][-1].exp()).argmax())
    first = generate_mixture(model, tokenizer, lambda: [using_adapter(model, "default"), using_adapter(model, "task2")],
                             prompt, max_new_tokens=1, temperature=0)
    assert first == tokenizer.decode([expected], skip_special_tokens=True).strip()


def test_cltune_generate_samples_a_shared_speaker_from_the_mixture(monkeypatch, capsys, tiny_config):
    from cltune.api import generate_from
    from cltune.modeling.batching import start_ids
    from cltune.modeling.generate import generate_mixture

    from helpers import run_cli

    config = tiny_config("progressive", [*PPL_ONLY, "progressive.shared_speakers=likelihood"])
    run_stream(config)
    capsys.readouterr()  # the run's progress lines
    phase2 = config.run_dir / "phase2"
    result = run_cli(monkeypatch, capsys, "generate", phase2, "--speaker", "Host", "--max-new-tokens", "5",
                     "--seed", "3")
    assert result.code == 0, result.err
    model, tokenizer, _ = load_checkpoint(phase2)
    router = load_router(phase2, model)
    assert len(router.agnostic_choices("<HOST>")) == 2 and len(router.agnostic_choices("<GUEST_B>")) == 1
    ids = [*start_ids(tokenizer), tokenizer.convert_tokens_to_ids("<HOST>")]  # as training began its rows
    direct = generate_mixture(model, tokenizer, lambda: router.agnostic_choices("<HOST>"), ids, max_new_tokens=5,
                              seed=3, start=len(ids) - 1)
    assert result.out.strip() == direct == generate_from(phase2, "Host", max_new_tokens=5, seed=3)

    # the cached mixture draws what the mixture recomputed from the whole sequence at every token draws (greedy)
    ids += tokenizer("so tell me", add_special_tokens=False)["input_ids"]
    sequence, start = list(ids), len(start_ids(tokenizer))
    with torch.no_grad():
        for _ in range(8):
            log_probs = []
            for weights in router.agnostic_choices("<HOST>"):
                with weights:
                    log_probs.append(torch.log_softmax(model(input_ids=torch.tensor([sequence])).logits[0], dim=-1))
            stacked = torch.stack(log_probs)  # (candidates, positions, vocab)
            seen = torch.tensor(sequence[start + 1 :])
            scores = stacked[:, start:-1].gather(-1, seen.view(1, -1, 1).expand(len(log_probs), -1, 1)).sum((1, 2))
            sequence.append(int(torch.logsumexp(torch.log_softmax(scores, 0)[:, None] + stacked[:, -1], 0).argmax()))
    cached = generate_mixture(model, tokenizer, lambda: router.agnostic_choices("<HOST>"), ids, max_new_tokens=8,
                              temperature=0, start=start)
    assert cached == tokenizer.decode(sequence[len(ids):], skip_special_tokens=True).strip() and cached


def test_the_routing_loss_is_the_mean_over_layers_of_the_gate_nll_of_each_targets_dataset():
    from cltune.strategies.fusion import routing_loss

    layer1 = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    layer2 = torch.tensor([[0.25, 0.75], [0.6, 0.4], [0.4, 0.6]])
    tasks = torch.tensor([0, 1, 1])
    expected = -(math.log(0.5) + math.log(0.25)) / 2 - (math.log(0.1) + math.log(0.4)) / 2 \
        - (math.log(0.8) + math.log(0.6)) / 2
    assert routing_loss([layer1, layer2], tasks).item() == pytest.approx(expected, rel=1e-6)


def gate_weight_of_task_1(strategy, examples) -> float:
    """The fusion gate's mean weight on task 1's adapter over every layer and every position that predicts a
    target of `examples` (what the routing loss trains; the start token and the padding carry no dataset)."""
    from cltune.modeling.batching import IGNORE, collate

    batch = collate(strategy.ctx.encode(examples), list(range(len(examples))), strategy.ctx.tokenizer.pad_token_id)
    with torch.no_grad():
        strategy.ctx.scorer.eval()(**batch.model_inputs())
    predicts = batch.labels[:, 1:] != IGNORE
    return float(torch.stack([w[:, :-1][predicts][..., 0].mean() for w in strategy.seen.values()]).mean())


def test_the_routing_loss_teaches_the_gate_which_dataset_a_text_comes_from(tiny_config, captured):
    """After phase 2 the gate gives task 1's adapter more weight on task 1's test text than on task 2's, and
    clearly more with the routing loss than from the language-model loss alone."""
    gaps = []
    for route_loss in (0.0, 1.0):
        config = tiny_config("fusion", [*PPL_ONLY, f"fusion.route_loss={route_loss}", "replay.ratio=0.5",
                                        "train.epochs=3"], name=f"route{route_loss}")
        run_stream(config)
        strategy = captured[-1]
        tasks = strategy.ctx.tasks
        gaps.append(gate_weight_of_task_1(strategy, tasks[0].test) - gate_weight_of_task_1(strategy, tasks[1].test))
    # seen at target positions, rows beginning with the start token: 0.059 with it, 0.013 without
    assert gaps[1] > 0.04 and gaps[1] > 3 * gaps[0]
