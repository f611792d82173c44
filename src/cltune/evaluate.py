"""Held-out perplexity and speaker attribution.

Perplexity of a split = exp(total NLL of target tokens / number of target tokens), where the
target tokens of an utterance are its text tokens and its end token (the speaker token is
context only). Batched, no gradients, fp32, dropout off, deterministic order.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from cltune.batching import collate, encode, length_grouped_batches
from cltune.data.split import Example
from cltune.scoring import TokenScorer, per_example_sums, target_nll


@torch.no_grad()
def example_nll(
    accelerator: Accelerator, scorer: TokenScorer, encoded: list[list[int]], pad_id: int, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and target count of every encoded utterance; work is split across processes."""
    n = len(encoded)
    batches = length_grouped_batches([len(s) for s in encoded], batch_size, seed=0, shuffle=False)
    mine = batches[accelerator.process_index :: accelerator.num_processes]
    was_training = scorer.training
    scorer.eval()
    results = []
    for indices in mine:
        batch = collate(encoded, indices, pad_id)
        inputs = {k: v.to(accelerator.device) for k, v in batch.model_inputs().items()}
        nll = target_nll(scorer(**inputs), inputs["labels"])
        sums = per_example_sums(nll.double(), batch.target_example, n)[indices].cpu()
        counts = per_example_sums(torch.ones_like(nll, dtype=torch.double), batch.target_example, n)[indices].cpu()
        results.append((indices, sums.tolist(), counts.tolist()))
    scorer.train(was_training)
    if accelerator.num_processes > 1:
        results = gather_object(results)
    total = torch.zeros(n, dtype=torch.double)
    count = torch.zeros(n, dtype=torch.double)
    for indices, sums, counts in results:
        total[indices] = torch.tensor(sums, dtype=torch.double)
        count[indices] = torch.tensor(counts, dtype=torch.double)
    return total, count


def perplexity(accelerator, scorer, tokenizer, examples: list[Example], max_length: int, batch_size: int = 32) -> float:
    total, count = example_nll(accelerator, scorer, encode(examples, tokenizer, max_length), tokenizer.pad_token_id, batch_size)
    return math.exp(total.sum().item() / count.sum().item())


def mean_loss(accelerator, scorer, tokenizer, examples: list[Example], max_length: int, batch_size: int = 32) -> float:
    return math.log(perplexity(accelerator, scorer, tokenizer, examples, max_length, batch_size))


def _ppl_and_attribution(total: torch.Tensor, count: torch.Tensor, examples: list[Example],
                         tokens: list[str]) -> tuple[float, float]:
    """From the summed NLLs and target counts of every (utterance, candidate token) pair."""
    total, count = total.view(len(examples), len(tokens)), count.view(len(examples), len(tokens))
    own = torch.tensor([tokens.index(e.token) for e in examples])
    rows = torch.arange(len(examples))
    ppl = math.exp(total[rows, own].sum().item() / count[rows, own].sum().item())
    return ppl, (total.argmin(dim=1) == own).double().mean().item()


def perplexity_and_attribution(
    accelerator, scorer, tokenizer, examples: list[Example], tokens: list[str], max_length: int, batch_size: int = 32
) -> tuple[float, float]:
    """Perplexity of `examples` and their speaker attribution, from one scoring of every utterance per token.

    Each utterance is scored once per candidate token (the dataset's speakers); the text and end
    tokens are the same targets in every variant, so the summed NLLs compare directly, and the
    variant with the utterance's own token is exactly what perplexity scores. With fewer than two
    candidates there is nothing to attribute: perplexity alone, attribution NaN.
    """
    if len(tokens) < 2 or not examples:
        return perplexity(accelerator, scorer, tokenizer, examples, max_length, batch_size), float("nan")
    variants = [Example(e.task, e.speaker, t, e.text, e.split, e.line) for e in examples for t in tokens]
    total, count = example_nll(accelerator, scorer, encode(variants, tokenizer, max_length), tokenizer.pad_token_id, batch_size)
    return _ppl_and_attribution(total, count, examples, tokens)


def routed_perplexity_and_attribution(
    accelerator, scorer, tokenizer, examples: list[Example], tokens: list[str], max_length: int, route,
    batch_size: int = 32,
) -> tuple[float, float]:
    """As `perplexity_and_attribution`, but every variant is scored by the weights `route(token)` gives
    its speaker token: what a user who knows only the speaker gets (agnostic routing)."""
    attribute = len(tokens) >= 2
    variants = [Example(e.task, e.speaker, t, e.text, e.split, e.line) for e in examples for t in tokens] if attribute \
        else list(examples)
    total = torch.zeros(len(variants), dtype=torch.double)
    count = torch.zeros(len(variants), dtype=torch.double)
    for token in sorted({v.token for v in variants}):
        picked = [i for i, v in enumerate(variants) if v.token == token]
        with route(token):
            sums, counts = example_nll(accelerator, scorer, encode([variants[i] for i in picked], tokenizer, max_length),
                                       tokenizer.pad_token_id, batch_size)
        total[picked], count[picked] = sums, counts
    if not attribute:
        return math.exp(total.sum().item() / count.sum().item()), float("nan")
    return _ppl_and_attribution(total, count, examples, tokens)


def test_row(ctx, router, tasks, settings, agnostic: bool = False) -> tuple[list[float], list[float | None]]:
    """One row of the matrix: each task's test perplexity and speaker attribution (None: fewer than two
    speakers). Oracle: each task served by the weights `router.oracle(task)` gives it, in one pass.
    `agnostic`: each utterance served by the weights its speaker token routes to."""
    ppl, attribution = [], []
    for task in tasks:
        candidates = list(task.tokens.values()) if settings.attribution else []
        if agnostic:
            value, share = routed_perplexity_and_attribution(ctx.accelerator, ctx.scorer, ctx.tokenizer, task.test,
                                                             candidates, ctx.max_length, router.agnostic,
                                                             settings.batch_size)
        else:
            with router.oracle(task.index):
                value, share = perplexity_and_attribution(ctx.accelerator, ctx.scorer, ctx.tokenizer, task.test,
                                                          candidates, ctx.max_length, settings.batch_size)
        ppl.append(value)
        attribution.append(None if math.isnan(share) else share)
    return ppl, attribution
