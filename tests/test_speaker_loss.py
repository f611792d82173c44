"""The speaker-discrimination loss (`train.speaker_loss`): its formula, its agreement with attribution's
scores, its gradient, and its cost in a run."""

from __future__ import annotations

import math

import pytest
import torch

from cltune.data import Example, Split, TaskData, Turn
from cltune.modeling.batching import collate, encode
from cltune.modeling.speaker_loss import SpeakerContrast, speaker_cross_entropy

from helpers import PPL_ONLY, prepared


def test_speaker_cross_entropy_by_hand():
    nll = torch.tensor([[2.0, 3.0, 5.0], [1.0, float("inf"), float("inf")], [4.0, 1.0, float("inf")]])
    expected = [2 + math.log(math.exp(-2) + math.exp(-3) + math.exp(-5)), 0.0,
                4 + math.log(math.exp(-4) + math.exp(-1))]
    assert speaker_cross_entropy(nll).tolist() == pytest.approx(expected, rel=1e-6)


def test_the_loss_is_attribution_comparison_made_differentiable(tiny_model_dir):
    """batch_sum equals −log p(own | text, context) computed from each variant's NLL scored on its own, and its
    gradient reaches the speaker token rows; a one-speaker dataset's utterances add nothing."""
    from accelerate import Accelerator

    from cltune.evaluation.evaluate import example_nll
    from cltune.modeling.scoring import TokenScorer, target_nll

    model, tok, _ = prepared(tiny_model_dir, tokens=("<HOST>", "<GUEST_A>", "<DOCS>"))
    tasks = [TaskData(0, "a", ["Host", "Guest A"], {"Host": "<HOST>", "Guest A": "<GUEST_A>"}, [], [], []),
             TaskData(1, "docs", ["Docs"], {"Docs": "<DOCS>"}, [], [], [])]
    turn = Turn("Host", "<HOST>", "so tell me", 1)
    examples = [Example(0, "Guest A", "<GUEST_A>", "i love pizza", Split.TRAIN, 2, (turn,)),
                Example(0, "Host", "<HOST>", "what do you think", Split.TRAIN, 3),
                Example(1, "Docs", "<DOCS>", "theory experiment", Split.TRAIN, 4)]
    encoded = encode(examples, tok, 32)
    scorer = TokenScorer(model)
    contrast = SpeakerContrast(examples, encoded, tasks, tok, tok.pad_token_id)
    batch = collate(encoded, [0, 1, 2], tok.pad_token_id)
    inputs = batch.model_inputs()
    loss = contrast.batch_sum(scorer, batch, target_nll(scorer(**inputs), inputs["labels"]))

    swapped = [Example(e.task, e.speaker, {"<GUEST_A>": "<HOST>", "<HOST>": "<GUEST_A>"}[e.token], e.text, e.split,
                       e.line, e.context) for e in examples[:2]]
    own, _ = example_nll(Accelerator(cpu=True), scorer, encoded[:2], tok.pad_token_id)
    other, _ = example_nll(Accelerator(cpu=True), scorer, encode(swapped, tok, 32), tok.pad_token_id)
    by_hand = sum(o + math.log(math.exp(-o) + math.exp(-x)) for o, x in zip(own.tolist(), other.tolist()))
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)

    loss.backward()
    rows = [p.grad for n, p in model.named_parameters() if "trainable_tokens_delta" in n and p.grad is not None]
    assert rows and any(g.abs().sum() > 0 for g in rows)
    docs = collate(encoded, [2], tok.pad_token_id)
    alone = contrast.batch_sum(scorer, docs, target_nll(scorer(**docs.model_inputs()), docs.model_inputs()["labels"]))
    assert alone.item() == 0


def test_a_run_with_the_speaker_loss_pays_one_more_pass_per_other_speaker(tiny_config):
    from cltune.studies.pipeline import run_stream

    plain = run_stream(tiny_config("naive", PPL_ONLY, name="plain"))
    contrast = run_stream(tiny_config("naive", [*PPL_ONLY, "train.speaker_loss=1.0"], name="contrast"))
    for a, b in zip(plain.phases, contrast.phases):
        assert b.target_tokens == a.target_tokens  # the logged loss and counts are the LM's
        # two speakers per dataset: the other speaker's pass doubles the training forwards (no padding in the
        # variants beyond their own micro-batch's), within the padding the two collations differ by
        assert b.strategy["training_backward_tokens"] == pytest.approx(2 * a.strategy["training_backward_tokens"],
                                                                       rel=0.1)
    assert contrast.ppl[1][0] != plain.ppl[1][0]
