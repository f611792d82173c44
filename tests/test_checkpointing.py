"""`model.gradient_checkpointing`: the same training, with each decoder layer recomputed in backward."""

from __future__ import annotations

import pytest
import torch

from cltune.modeling.batching import collate
from cltune.modeling.scoring import target_nll
from cltune.training.session import build_session


def _step(session, examples):
    """Gradients of one training micro-batch, and how often each decoder layer ran forward for it."""
    ctx = session.ctx
    calls = []
    layers = ctx.model.get_base_model().get_decoder().layers
    # inside each layer: a checkpointed layer's recompute runs its attention again (the layer's own hooks stay
    # outside the checkpoint)
    hooks = [layer.self_attn.register_forward_hook(lambda *_: calls.append(1)) for layer in layers]
    encoded = ctx.encode(examples)
    inputs = collate(encoded, list(range(len(encoded))), ctx.tokenizer.pad_token_id).model_inputs()
    ctx.scorer.train()
    target_nll(ctx.scorer(**inputs), inputs["labels"]).mean().backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.requires_grad}
    return grads, len(calls) // len(layers)


def test_checkpointed_layers_run_twice_and_give_the_same_gradients(tiny_config):
    plain = build_session(tiny_config("naive", name="plain"))
    checkpointed = build_session(tiny_config("naive", ["model.gradient_checkpointing=true"], name="checkpointed"))
    examples = plain.tasks[0].train[:6]
    grads, runs = _step(plain, examples)
    again, reruns = _step(checkpointed, examples)
    assert (runs, reruns) == (1, 2)  # each layer's forward is recomputed during backward
    assert grads.keys() == again.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(again[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_checkpointed_stream_scores_as_the_plain_one(tiny_config):
    from cltune.studies.pipeline import run_stream

    sets = ["eval.attribution=false", "eval.samples_per_speaker=0"]
    plain = run_stream(tiny_config("ewc_replay", sets, name="plain"))
    checkpointed = run_stream(tiny_config("ewc_replay", [*sets, "model.gradient_checkpointing=true"],
                                          name="checkpointed"))
    for row, again in zip(plain.ppl, checkpointed.ppl):
        assert again == pytest.approx(row, rel=1e-4)


def test_a_model_without_support_is_refused_in_one_line(tiny_config, monkeypatch):
    from cltune.errors import UserError

    monkeypatch.setattr(type(build_session(tiny_config("naive")).ctx.model.get_base_model()),
                        "supports_gradient_checkpointing", False)
    with pytest.raises(UserError, match="model.gradient_checkpointing: .* does not support it; set it to false"):
        build_session(tiny_config("naive", ["model.gradient_checkpointing=true"]))
