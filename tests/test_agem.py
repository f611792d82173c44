"""A-GEM: the projection against hand-computed vectors, the hook on the tiny model, and a stream."""

from __future__ import annotations

import csv
import logging
import random
import re

import torch

from cltune.data.split import Split
from cltune.modeling.batching import collate
from cltune.modeling.scoring import target_nll
from cltune.strategies.agem import AGEM, agem_project
from cltune.strategies.base import StepInfo
from cltune.strategies.replay import replay_sample
from cltune.strategies.shared import flatten
from cltune.studies import pipeline

from helpers import QUIET_EVAL

STEP = StepInfo(phase=2, step=1, steps=1, epoch=0)  # a step of a third phase, after both tasks are in memory


def test_conflicting_gradient_loses_exactly_its_component_along_the_reference():
    # g·g_ref = −8, g_ref·g_ref = 4: g − (−8/4)·g_ref = (3, −4) + (0, 4) = (3, 0)
    assert agem_project(torch.tensor([3.0, -4.0]), torch.tensor([0.0, 2.0])).tolist() == [3.0, 0.0]
    # g·g_ref = −2, g_ref·g_ref = 2: (1, −3, 0) + (1, 1, 0) = (2, −2, 0), now orthogonal to g_ref
    projected = agem_project(torch.tensor([1.0, -3.0, 0.0]), torch.tensor([1.0, 1.0, 0.0]))
    assert projected.tolist() == [2.0, -2.0, 0.0]
    assert torch.dot(projected, torch.tensor([1.0, 1.0, 0.0])).item() == 0.0


def test_agreeing_or_orthogonal_gradient_is_returned_untouched():
    agreeing = torch.tensor([2.0, -2.0, 1.0])  # g·g_ref = 1
    assert agem_project(agreeing, torch.tensor([1.0, 1.0, 1.0])) is agreeing
    orthogonal = torch.tensor([1.0, 0.0])  # g·g_ref = 0: no increase of the memory loss to first order
    assert agem_project(orthogonal, torch.tensor([0.0, 1.0])) is orthogonal




def test_hook_projects_the_step_gradient_against_the_memory_gradient(tiny_config, captured):
    # memory_batch above the memory's size: the reference is the whole memory's gradient, computed
    # in length-sorted passes of 8 (half of 48 + 32 training utterances: 5 passes) and checked against one.
    # LoRA dropout 0.5 so that "dropout off in the reference pass" is observable.
    config = tiny_config("agem", eval=QUIET_EVAL, agem={"memory_batch": 1000, "memory_ratio": 0.5},
                         lora={"r": 4, "alpha": 8, "dropout": 0.5})
    pipeline.run_stream(config)
    strategy: AGEM = captured[0]
    ctx = strategy.ctx
    for task in ctx.tasks:  # the seeded 10% training sample of each finished dataset, nothing else
        assert strategy.memory.samples[task.index] == replay_sample(task.train, 0.5, ctx.seed + task.index)
    assert all(e.split is Split.TRAIN for e in strategy.memory.examples())

    params = ctx.trainable()
    memory = ctx.encode(strategy.memory.examples())
    batch = collate(memory, list(range(len(memory))), ctx.tokenizer.pad_token_id)
    ctx.scorer.eval()
    loss = target_nll(ctx.scorer(**batch.model_inputs()), batch.labels).mean()
    reference = flatten(torch.autograd.grad(loss, list(params.values())), params)
    ctx.scorer.train()
    assert torch.allclose(strategy.reference_gradient(params, STEP), reference, rtol=1e-4, atol=1e-7)
    assert ctx.scorer.training

    torch.manual_seed(0)
    noise = torch.randn_like(reference)
    orthogonal = noise - torch.dot(noise, reference) / torch.dot(reference, reference) * reference

    def set_grads(flat: torch.Tensor) -> list[torch.Tensor]:
        sizes = [p.numel() for p in params.values()]
        for p, piece in zip(params.values(), flat.split(sizes)):
            p.grad = piece.view_as(p).clone()
        return [p.grad for p in params.values()]

    def step_gradient() -> torch.Tensor:
        return flatten([p.grad for p in params.values()], params)

    steps, projected = strategy.steps, strategy.projected
    grads = set_grads(orthogonal - reference)  # g·g_ref = −|g_ref|² < 0
    strategy.after_backward(STEP)
    assert torch.allclose(step_gradient(), orthogonal, atol=1e-5)  # the conflicting part gone, the rest kept
    assert all(p.grad is g for p, g in zip(params.values(), grads))  # written in place (DDP buckets)
    set_grads(orthogonal + reference)
    strategy.after_backward(STEP)
    assert torch.equal(step_gradient(), orthogonal + reference)
    assert (strategy.steps, strategy.projected) == (steps + 2, projected + 1)

    restarted = AGEM(ctx, strategy.settings)
    restarted.load_state(strategy.state())
    assert restarted.memory.examples() == strategy.memory.examples()
    assert restarted.encoded == strategy.encoded
    assert ((restarted.phase, restarted.steps, restarted.projected)
            == (strategy.phase, strategy.steps, strategy.projected))


def monologue(path, words: list[str], rows: int, seed: int):
    """One speaker only, so two such datasets share every context and differ only in what follows."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["speaker", "text"])
        for _ in range(rows):
            writer.writerow(["Guest", " ".join(rng.choices(words, k=rng.randint(3, 9)))])
    return path


def test_projection_is_active_when_the_new_task_contradicts_the_memory(tiny_config, tmp_path, caplog):
    pizza = monologue(tmp_path / "pizza.csv", "i really love pizza and music and long walks outside".split(), 40, 1)
    physics = monologue(tmp_path / "physics.csv", "quantum fields particles energy universe theory".split(), 40, 2)
    tasks = [{"path": str(pizza), "name": "pizza"}, {"path": str(physics), "name": "physics"}]
    with caplog.at_level(logging.INFO, logger="cltune.strategies.agem"):
        # two epochs: phase 2's first steps (3 an epoch) can all agree with the memory while the new text is unlearned
        metrics = pipeline.run_stream(tiny_config("agem", ["train.epochs=2"], eval=QUIET_EVAL, tasks=tasks))
    lines = [r.getMessage() for r in caplog.records if r.name == "cltune.strategies.agem"]
    # phase 1 has no memory, so no reference pass and no line; phase 2 has one pass per optimizer step
    assert len(lines) == 1 and lines[0].startswith("agem, physics: projected ")
    projected, steps = map(int, re.fullmatch(r"agem, physics: projected (\d+) of (\d+) steps", lines[0]).groups())
    assert steps == metrics.phases[1].steps
    assert projected >= 1  # the same speaker token now continues differently: some steps conflict
