"""Per-utterance gradients of the trainable weights from batched passes (the EWC Fisher's input).

Utterance i's loss depends only on its own row of the batch, so one backward of the summed loss of a
batch gives every position's exact gradient with respect to the activations. The weights cltune
trains enter the model linearly at each position — LoRA factors as `nn.Linear` layers, the new token
rows as embedding rows and as LM-head rows — so an utterance's gradient of such a weight is a sum
over its own positions of (activation gradient) ⊗ (input), rebuilt here with one einsum per layer.
Same numbers as one backward per utterance (tested), from passes of up to `batch_size` utterances.

Any other trainable weight (a strategy that trains something else) makes `per_example_grads` fall
back to one backward per utterance, so the result is always exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cltune.data.split import Example, require_no_test
from cltune.modeling.batching import IGNORE, collate
from cltune.modeling.memory import release_free_memory
from cltune.modeling.scoring import _new_rows, fp32_arithmetic, target_nll

Tensors = dict[str, torch.Tensor]


# Positions (utterances × longest) per batched pass: a pass keeps every layer's activations for its
# backward, about 1 MB per position for SmolLM2-135M in fp32, so the budget bounds the Fisher's memory.
PASS_POSITIONS = 256


def per_example_grads(ctx, examples: list[Example], batch_size: int = 8) -> Iterable[Tensors]:
    """Gradient of each utterance's log-likelihood (the sum of its target tokens' NLL) with respect to
    the trainable parameters, dropout off, in fp32 arithmetic (a bf16 run's base is upcast meanwhile:
    bf16 matmuls left a few percent of noise in the squared gradients). One dict per utterance, in the
    deterministic order of the passes (`indexed_grads` says which is which)."""
    return (grads for _, grads in indexed_grads(ctx, examples, batch_size))


def indexed_grads(ctx, examples: list[Example], batch_size: int = 8) -> Iterator[tuple[int, Tensors]]:
    """(index in `examples`, its gradients) for every utterance, from passes of at most `batch_size`
    utterances of similar length and `PASS_POSITIONS` positions; `batch_size` 1 is one backward each."""
    examples = require_no_test(examples, "Fisher estimation")
    params = ctx.trainable()
    encoded = ctx.encode(examples)
    was_training = ctx.scorer.training
    ctx.scorer.eval()
    try:
        with fp32_arithmetic(ctx.scorer):
            if batch_size == 1 or _linear_layers(ctx.model, params) is None:
                yield from enumerate(_one_at_a_time(ctx, params, encoded))
                return
            for indices in _passes([len(s) for s in encoded], batch_size):
                yield from zip(indices, _batch_grads(ctx, params, encoded, indices))
                release_free_memory()  # each pass's activations would otherwise leave the heap fragmented
    finally:
        ctx.scorer.train(was_training)


def _passes(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Utterances sorted by length, cut into passes of at most `batch_size` rows and `PASS_POSITIONS`
    padded positions (a longer utterance gets a pass of its own)."""
    passes: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        current = passes[-1] if passes else None
        if current and len(current) < batch_size and (len(current) + 1) * lengths[i] <= PASS_POSITIONS:
            current.append(i)
        else:
            passes.append([i])
    return passes


def _one_at_a_time(ctx, params: dict[str, nn.Parameter], encoded: list[list[int]]) -> Iterator[Tensors]:
    for i in range(len(encoded)):
        batch = collate(encoded, [i], ctx.tokenizer.pad_token_id)
        inputs = {k: v.to(ctx.accelerator.device) for k, v in batch.model_inputs().items()}
        loss = target_nll(ctx.scorer(**inputs), inputs["labels"]).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        yield {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads)}


def _linear_layers(model: nn.Module, params: dict[str, nn.Parameter]) -> list[tuple[str, nn.Linear]] | None:
    """The bias-free `nn.Linear` layers holding trainable weights, named by their weight, when every
    trainable parameter is one of those or a new-token row block; otherwise None."""
    by_id = {id(p): n for n, p in params.items()}
    layers = [(by_id[id(m.weight)], m) for m in model.modules()
              if isinstance(m, nn.Linear) and id(m.weight) in by_id and m.bias is None]
    covered = {id(m.weight) for _, m in layers} | {id(rows[2]) for rows in _row_blocks(model)}
    return layers if covered >= set(by_id) else None


def _row_blocks(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = [_new_rows(base.get_input_embeddings()), _new_rows(base.get_output_embeddings())]
    return [rows for rows in found if rows is not None and rows[2].requires_grad]


@contextmanager
def _taps(layers: list[tuple[str, nn.Linear]], decoder: nn.Module) -> Iterator[dict]:
    """Record each layer's (input, output) and the decoder's `inputs_embeds` during one forward."""
    seen: dict = {"linear": [], "embeds": None}
    handles = [m.register_forward_hook(lambda m, args, out, name=name: seen["linear"].append((name, args[0], out)))
               for name, m in layers]
    handles.append(decoder.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(embeds=kwargs.get("inputs_embeds")), with_kwargs=True))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _batch_grads(ctx, params: dict[str, nn.Parameter], encoded: list[list[int]], indices: list[int]) -> list[Tensors]:
    """Each utterance's gradients from one forward and one backward of the batch `indices`."""
    model = ctx.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = _linear_layers(model, params)
    batch = collate(encoded, indices, ctx.tokenizer.pad_token_id)
    inputs = {k: v.to(ctx.accelerator.device) for k, v in batch.model_inputs().items()}
    n = len(indices)
    with _taps(layers, base.get_decoder()) as seen:
        logits, hidden = ctx.scorer(**inputs, return_hidden=True)
    loss = target_nll(logits, inputs["labels"]).sum()
    embeds = seen["embeds"]
    wrt = [out for _, _, out in seen["linear"]] + [logits] + ([embeds] if embeds is not None else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    out = {name: torch.zeros((n, *p.shape), dtype=torch.float32, device=p.device) for name, p in params.items()}
    for (name, x, _), g in zip(seen["linear"], grads):
        if g is not None:  # (batch, positions, out) ⊗ (batch, positions, in), summed over positions
            out[name] += torch.einsum("bto,bti->boi", g.float(), x.float())
    names = {id(p): name for name, p in params.items()}
    targets = inputs["labels"][:, 1:] != IGNORE  # the scorer's logits are these positions, row-major
    example = torch.arange(n, device=logits.device)[:, None].expand_as(targets)[targets]
    input_ids = inputs["input_ids"]
    g_logits = grads[len(seen["linear"])]
    g_embeds = grads[-1] if embeds is not None else None
    base_in, base_out = base.get_input_embeddings(), base.get_output_embeddings()
    for module, rows in ((base_in, _new_rows(base_in)), (base_out, _new_rows(base_out))):
        if rows is None or id(rows[2]) not in names:
            continue
        _, ids, delta = rows
        name = names[id(delta)]
        if module is base_in and g_embeds is not None:  # row j is the input at the positions holding token ids[j]
            hits = (input_ids[..., None] == ids).to(torch.float32)  # (batch, positions, rows)
            out[name] += torch.einsum("btj,btw->bjw", hits, g_embeds.float())
        elif module is base_out and g_logits is not None:  # row j scores column ids[j] at every target
            per_target = torch.einsum("nj,nw->njw", g_logits[:, ids].float(), hidden.float())
            out[name].index_add_(0, example, per_target)
    return [{name: out[name][i].to(p.dtype) for name, p in params.items()} for i in range(n)]
