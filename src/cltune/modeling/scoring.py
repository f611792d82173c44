"""Per-token negative log-likelihood of a causal LM, the one computation behind training loss,
perplexity, attribution, Fisher and distillation.

Two speed-ups over calling the model, with identical results (tested):
- the LM head runs only at target positions (pads and each utterance's last token need no logits);
- with PEFT trainable-token rows, the frozen embedding matrix is used as is and only the new rows
  are patched in, instead of materializing (and back-propagating into) a full copy of the
  vocabulary × width matrix at every step in the embedding and again in the tied LM head.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from cltune.modeling.batching import IGNORE
from cltune.modeling.memory import release_free_memory
from cltune.modeling.model import settle_dtypes


def _new_rows(module: nn.Module):
    """(frozen weight, new-row ids, trainable rows) of a PEFT trainable-tokens wrapper whose single
    active adapter is unmerged; None when the plain module call is the right path."""
    layer = getattr(module, "token_adapter", None)
    if layer is None or layer.merged or layer.disable_adapters or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.trainable_tokens_delta or layer._get_embed_scale() is not None:
        return None
    weight = layer.base_layer.weight
    ids = torch.as_tensor(layer.token_indices[name], device=weight.device)
    return weight, ids, layer.trainable_tokens_delta[name]


def _embed(module: nn.Module, input_ids: torch.Tensor) -> torch.Tensor | None:
    rows = _new_rows(module)
    if rows is None or not isinstance(module.token_adapter.base_layer, nn.Embedding):
        return None
    weight, ids, delta = rows
    slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
    slot[ids] = torch.arange(len(ids), device=weight.device)
    slots = slot[input_ids]
    base = F.embedding(input_ids, weight)
    dtype = torch.promote_types(base.dtype, delta.dtype)  # fp32 rows over a bf16 base stay fp32
    # F.embedding, not delta[slots]: indexing's backward adds each row's many positions with parallel float atomics
    # (CPU), in an order that changes run to run; the embedding's backward sums them in a fixed order.
    new = F.embedding(slots.clamp(min=0), delta)
    return torch.where((slots >= 0).unsqueeze(-1), new.to(dtype), base.to(dtype))


def _head(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    rows = _new_rows(module)
    if rows is None or not isinstance(module.token_adapter.base_layer, nn.Linear):
        return module(hidden)
    weight, ids, delta = rows
    return F.linear(hidden, weight).index_copy(-1, ids, F.linear(hidden, delta.to(hidden.dtype)))


@contextmanager
def sparse_token_rows(model: nn.Module) -> Iterator[None]:
    """Inside: the model's own forward (generation's) reads the new token rows as `TokenScorer` does — the
    embedding looked up, then the new rows put in place; the head's logits, then the new rows' columns —
    instead of PEFT's, which rebuilds the whole (vocabulary × width) matrix on every call: 2 × 30 ms of a
    120 ms generation step of SmolLM2-135M on a 2-core CPU. Same numbers (tested); where the rows are
    merged, several adapters are active or the embedding is scaled, the wrapper's own forward runs."""
    wrappers = [m for m in model.modules() if hasattr(m, "token_adapter")]
    originals = [m.forward for m in wrappers]
    own = ["forward" in m.__dict__ for m in wrappers]  # a forward set on the instance (a hook) is put back as it was

    def sparse(module: nn.Module, original):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            rows = _new_rows(module) if not args and not kwargs else None
            base = module.token_adapter.base_layer if rows is not None else None
            if isinstance(base, nn.Embedding) and base.max_norm is None:  # padding_idx only shapes gradients
                return _embed(module, x).to(rows[0].dtype)  # the base's dtype, as PEFT's merged matrix has
            if isinstance(base, nn.Linear) and base.bias is None:
                return _head(module, x)
            return original(x, *args, **kwargs)
        return forward

    for module, original in zip(wrappers, originals):
        module.forward = sparse(module, original)
    try:
        yield
    finally:
        for module, original, instance in zip(wrappers, originals, own):
            if instance:
                module.forward = original
            else:
                del module.forward  # back to the class's forward


class TokenScorer(nn.Module):
    """Wraps a (PEFT) causal LM; forward returns the logits at target positions.

    It is a module so that Accelerate/DDP can prepare it: its forward is the model's forward.
    With `compute_dtype` (bf16 runs: the frozen base is stored in bf16), matmuls run in that dtype
    under autocast while the residual stream, norms and softmax stay fp32 — autocast's numerics,
    without casting the whole base on every forward. Inside `fp32_arithmetic()` (evaluation, unless
    `eval.precision: run`) the base is upcast and everything runs in fp32.
    """

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype | None = None, fp32_evaluation: bool = True):
        super().__init__()
        self.model = model
        self.compute_dtype = compute_dtype
        self.fp32_evaluation = fp32_evaluation
        # Token positions through the model outside evaluation (the cost ledger): every forward, and
        # the forwards that build a graph (a backward follows). Evaluation runs inside `uncounted()`.
        self.forward_tokens = 0
        self.backward_tokens = 0
        self._counting = True

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        counting, self._counting = self._counting, False
        try:
            yield
        finally:
            self._counting = counting

    @contextmanager
    def fp32_arithmetic(self) -> Iterator[None]:
        """fp32 arithmetic meanwhile: a low-precision frozen base is upcast (bf16 → fp32 → bf16 is exact,
        so the stored weights come back bit for bit) and the forward runs without autocast. Costs the
        fp32 copy's memory while it lasts; nested uses upcast once. A no-op for an fp32 scorer or one
        built with `fp32_evaluation=False`."""
        if self.compute_dtype is None or not self.fp32_evaluation:
            yield
            return
        low = self.compute_dtype
        release_free_memory()  # room for the fp32 copy out of the slack training left
        settle_dtypes(self.model, torch.float32)
        self.compute_dtype = None
        try:
            yield
        finally:
            self.compute_dtype = low
            settle_dtypes(self.model, low)
            release_free_memory()

    def _base(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                return_hidden: bool = False, lead: torch.Tensor | None = None,
                row_tokens: torch.Tensor | None = None,
                source: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits at target positions, shape (targets, vocab), row-major over the batch; with
        `return_hidden`, also the last hidden states there, shape (targets, width).

        `lead` (per row: leading positions before its first target) and `row_tokens` (per row: its real
        tokens; one sequence a row, right-padded) make a forward that builds a graph compute each row's
        lead without one (`_lead_apart`): the same logits, no gradient through the lead. With `source` (per
        row: the row whose first `lead` tokens are its own, itself for a row computed whole), a row of another
        source reads its lead from that row's keys and values instead of computing it (`_branches`)."""
        whole = None if source is None else source == torch.arange(len(source), device=source.device)
        branched = whole is not None and not bool(whole.all())
        split = (not branched and lead is not None and torch.is_grad_enabled() and bool(lead.any())
                 and not self._checkpointing())
        if self._counting:
            self._count(input_ids, lead, row_tokens, whole if branched else None, split)
        low = self.compute_dtype is not None
        with torch.autocast(input_ids.device.type, dtype=self.compute_dtype, enabled=low):
            base = self._base()
            decoder = base.get_decoder()
            embeds = _embed(base.get_input_embeddings(), input_ids)
            if low or branched or split:
                embeds = base.get_input_embeddings()(input_ids) if embeds is None else embeds
                embeds = embeds.float() if low else embeds  # a low-precision run's residual stream starts fp32
            if branched:
                at_targets = _branches(decoder, embeds, position_ids, labels, lead, row_tokens, source, whole)
            else:
                if split:
                    hidden, labels = _lead_apart(decoder, embeds, position_ids, labels, lead, row_tokens)
                else:
                    inputs = {"input_ids": input_ids} if embeds is None else {"inputs_embeds": embeds}
                    hidden = decoder(**inputs, position_ids=position_ids, use_cache=False).last_hidden_state
                at_targets = _at_targets(hidden, labels)
            logits = _head(base.get_output_embeddings(), at_targets)
        return (logits, at_targets) if return_hidden else logits

    def _count(self, input_ids, lead, row_tokens, whole, split: bool) -> None:
        """The ledger: positions through the model, and those with a graph. Branch rows (those not `whole`)
        compute only their own tokens; a split-off lead has no graph."""
        grad = torch.is_grad_enabled()
        if whole is not None:
            computed = int(row_tokens[whole].sum() + (row_tokens - lead)[~whole].sum())
            self.forward_tokens += computed
            self.backward_tokens += computed if grad else 0
            return
        self.forward_tokens += input_ids.numel()
        self.backward_tokens += input_ids.numel() - (int(lead.sum()) if split else 0) if grad else 0

    def _checkpointing(self) -> bool:
        """Gradient checkpointing recomputes each layer, which would write a key/value cache twice."""
        return bool(getattr(self._base(), "is_gradient_checkpointing", False))


def _lead_apart(decoder: nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                lead: torch.Tensor, row_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states after each row's lead, and their labels (`_after_leads`), with the leads
    computed without a graph: one pass over the leads (the first `lead.max()` positions of every row) fills a
    key/value cache that the rest of each row attends to. The forward is the whole row's; the backward skips the
    leads. Every target lies after its row's lead, and a row's targets keep their order, so the targets read from
    these hidden states are the whole rows' targets in the same order."""
    from transformers import DynamicCache

    width = int(lead.max())
    cache = DynamicCache()
    with torch.no_grad():
        decoder(inputs_embeds=embeds[:, :width], position_ids=position_ids[:, :width], cache=cache, use_cache=True)
    return _after_leads(decoder, embeds, position_ids, labels, lead, row_tokens, cache, width)


def _after_leads(decoder: nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                 lead: torch.Tensor, row_tokens: torch.Tensor, cache, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's tokens after its lead (`lead[r]` to `row_tokens[r]`, moved to the front and right-padded) through
    the decoder, attending to the first `lead[r]` of the `width` positions `cache` holds for that row (the rest
    of them, another row's or nobody's, masked out): their last hidden states and labels."""
    device = embeds.device
    rest = row_tokens - lead
    steps = torch.arange(int(rest.max()), device=device)
    index = (lead[:, None] + steps[None]).clamp(max=embeds.shape[1] - 1)
    real = steps[None] < rest[:, None]
    kept = torch.arange(width, device=device)[None] < lead[:, None]
    hidden = decoder(inputs_embeds=embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1])),
                     position_ids=position_ids.gather(1, index), attention_mask=torch.cat([kept, real], 1).long(),
                     cache=cache, use_cache=True).last_hidden_state
    return hidden, labels.gather(1, index).masked_fill(~real, IGNORE)


# Key/value positions a chunk of branch rows may hold (rows × their source's width): about 46 kB each for
# SmolLM2-135M in fp32, so a chunk's cache stays under 400 MB.
BRANCH_POSITIONS = 8192


def _branches(decoder: nn.Module, embeds: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
              lead: torch.Tensor, row_tokens: torch.Tensor, source: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states at every row's targets, row-major, computing each shared lead once.

    Rows whose `source` is themselves (`whole`) go through the decoder whole, into a key/value cache. Every other
    row (a branch: the same first `lead` tokens as its source, then its own) computes only its own tokens,
    attending to its source's first `lead` keys and values: evaluation's variants of a window (attribution's
    other speaker tokens after the same turns) cost their own tokens, not the window again. The same
    hidden states as each row computed whole; branches go in chunks of at most `BRANCH_POSITIONS` cached
    positions."""
    from transformers import DynamicCache

    device = embeds.device
    whole, branch = whole.nonzero().squeeze(1), (~whole).nonzero().squeeze(1)
    cache = DynamicCache()
    hidden = decoder(inputs_embeds=embeds[whole], position_ids=position_ids[whole], cache=cache,
                     use_cache=True).last_hidden_state
    pieces = {int(r): _at_targets(hidden[k], labels[r]) for k, r in enumerate(whole)}
    held = [(layer.keys, layer.values) for layer in cache.layers]
    slot = torch.full((len(source),), -1, dtype=torch.long, device=device)
    slot[whole] = torch.arange(len(whole), device=device)
    width = hidden.shape[1]
    chunk = max(1, BRANCH_POSITIONS // width)
    for start in range(0, len(branch), chunk):
        rows = branch[start : start + chunk]
        own = slot[source[rows]]
        part = DynamicCache()
        for layer, (keys, values) in enumerate(held):
            part.update(keys[own], values[own], layer)
        out, row_labels = _after_leads(decoder, embeds[rows], position_ids[rows], labels[rows], lead[rows],
                                       row_tokens[rows], part, width)
        pieces |= {int(r): _at_targets(out[k], row_labels[k]) for k, r in enumerate(rows)}
    return torch.cat([pieces[r] for r in range(len(source))])


def _at_targets(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The hidden states at the positions that predict targets, row-major: of a batch (rows, positions, width)
    with its labels (rows, positions), or of one row (positions, width) with its (positions)."""
    return hidden[..., :-1, :][labels[..., 1:] != IGNORE]


def uncounted(scorer: nn.Module):
    """The scorer's `uncounted()` (through an Accelerate/DDP wrapper), or a no-op for another module."""
    inner = getattr(scorer, "module", scorer)
    return inner.uncounted() if isinstance(inner, TokenScorer) else nullcontext()


def fp32_arithmetic(scorer: nn.Module):
    """The scorer's `fp32_arithmetic()` (through an Accelerate/DDP wrapper), or a no-op for another module."""
    inner = getattr(scorer, "module", scorer)
    return inner.fp32_arithmetic() if isinstance(inner, TokenScorer) else nullcontext()


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL of each target token (fp32), in the same order as the scorer's logits."""
    targets = labels[:, 1:][labels[:, 1:] != IGNORE]
    if logits.dtype == torch.float32:
        return F.cross_entropy(logits, targets, reduction="none")
    return _ChunkedNLL.apply(logits, targets)


class _ChunkedNLL(torch.autograd.Function):
    """NLL = logsumexp(row) − row[target] of low-precision (bf16/fp16) logits, computed in fp32 a few
    rows at a time.

    `cross_entropy(logits.float())` would build an fp32 copy of the whole (targets × vocab) matrix and
    keep its log-softmax for backward (157 MB for 800 targets of a 49k vocabulary); here each chunk's
    fp32 copy fits in cache, backward keeps one number per row, and the gradient is softmax − one-hot
    rebuilt chunk by chunk. Same values as the fp32 path (tested); about twice as fast on a CPU.
    """

    CHUNK_ELEMENTS = 1 << 21

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = max(1, _ChunkedNLL.CHUNK_ELEMENTS // logits.shape[-1])
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            lse[start : start + rows] = torch.logsumexp(logits[start : start + rows].float(), dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return lse - logits.gather(1, targets[:, None]).squeeze(1).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        out = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            part = slice(start, start + ctx.rows)
            p = logits[part].float().sub_(lse[part, None]).exp_()  # softmax (a fresh fp32 copy: logits are not fp32)
            p.scatter_add_(1, targets[part, None], torch.full((p.shape[0], 1), -1.0, device=p.device))
            out[part] = p.mul_(grad[part, None])
        return out, None


def per_example_sums(values: torch.Tensor, target_example: torch.Tensor, n: int) -> torch.Tensor:
    """Sum per-token values into one number per example (indices from the batch)."""
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    return out.index_add_(0, target_example.to(values.device), values)
