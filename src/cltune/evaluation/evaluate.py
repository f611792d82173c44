"""Held-out perplexity and speaker attribution.

Perplexity of a split = exp(total NLL of target tokens / number of target tokens), where the
target tokens of an utterance are its text tokens and its end token (its speaker token and, with
`data.context_turns` > 0, the earlier turns before it are context only). Batched, no gradients,
dropout off, deterministic order; in fp32 arithmetic whatever the run's precision (a bf16 run's
frozen base is upcast meanwhile, `TokenScorer.fp32_arithmetic`), or in the run's precision with
`eval.precision: run`; NLL sums in fp64.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from cltune.data.split import Example
from cltune.modeling.batching import collate, context_of, encode, length_grouped_batches, window_batches
from cltune.modeling.scoring import TokenScorer, fp32_arithmetic, per_example_sums, target_nll, uncounted


@torch.no_grad()
def example_nll(
    accelerator: Accelerator, scorer: TokenScorer, encoded: list[list[int]], pad_id: int, batch_size: int = 32,
    fp32: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and target count of every encoded utterance; work is split across processes.

    In evaluation's arithmetic (`fp32_arithmetic`: the figures a run reports), or with `fp32=False` in the run's
    own: for choices a run makes as it trains, which serve in that precision (validated routes)."""
    n = len(encoded)
    if any(getattr(s, "window", None) is not None for s in encoded):  # whole windows, one row each
        batches = window_batches(encoded, batch_size)
    else:
        batches = length_grouped_batches([len(s) for s in encoded], batch_size, seed=0, shuffle=False)
    mine = batches[accelerator.process_index :: accelerator.num_processes]
    was_training = scorer.training
    scorer.eval()
    results = []
    arithmetic = fp32_arithmetic(scorer) if fp32 else nullcontext()
    with uncounted(scorer), arithmetic:  # evaluation is not part of a strategy's cost
        for indices in mine:
            batch = collate(encoded, indices, pad_id, merge=True, branch=True)
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
    total, count = example_nll(accelerator, scorer, encode(examples, tokenizer, max_length), tokenizer.pad_token_id,
                               batch_size)
    return math.exp(total.sum().item() / count.sum().item())


@dataclass
class Scores:
    """A split's perplexity and speaker attribution (NaN: fewer than two candidates), and each utterance's
    summed target NLL and target count under its own speaker token (for paired comparisons)."""

    ppl: float
    attribution: float
    nll: list[float]
    targets: list[int]
    # Seconds of the scoring, and the share of them attribution added: the other candidates' variants'
    # part of the scored positions (one pass scores them all, so the time is apportioned, not clocked apart).
    seconds: float = 0.0
    attribution_s: float = 0.0


def mixture_nll(nll: torch.Tensor) -> torch.Tensor:
    """−log of the equal-prior mixture of C candidates' likelihoods, per utterance: nll is (C, utterances) of
    summed NLLs; −log((1/C) Σ_c exp(−nll_c)). With one candidate, its NLL."""
    return -(torch.logsumexp(-nll.double(), dim=0) - math.log(nll.shape[0]))


# Per-variant summed NLLs and target counts of one split scored by named weights (`score_split`'s `memo`)
Scored = dict[str, tuple[torch.Tensor, torch.Tensor]]


def score_split(accelerator, scorer, tokenizer, examples: list[Example], tokens: list[str], max_length: int,
                batch_size: int = 32, route=None, name: str | None = None, memo: Scored | None = None) -> Scores:
    """Perplexity and attribution of `examples`, from one scoring of every utterance per candidate token.

    Each utterance is scored once per candidate token (the dataset's speakers), after the same
    context turns; the text and end tokens are the same targets in every variant, so the summed
    NLLs compare directly, and the variant with the utterance's own token is exactly what
    perplexity scores. Without `route` all variants go through the model as it is, in one pass;
    with it, each variant is scored by the weights `route(token)` gives its speaker token, as (name,
    weights) pairs (agnostic routing: what a user who knows only the speaker gets): one candidate, or
    several scored as an equal-prior mixture (`mixture_nll`).

    `memo` (the same examples and tokens): unrouted scoring by weights called `name` leaves its NLLs there,
    and routed scoring takes a candidate's NLLs from there instead of scoring them again.
    """
    start = time.perf_counter()
    attribute = len(tokens) >= 2
    variants = [replace(e, token=t) for e in examples for t in tokens] if attribute else list(examples)
    pad = tokenizer.pad_token_id
    encoded = encode(variants, tokenizer, max_length)
    memo = {} if memo is None else memo
    if route is None:
        if name is not None and name in memo:
            total, count = memo[name]
        else:
            total, count = example_nll(accelerator, scorer, encoded, pad, batch_size)
        if name is not None:
            memo[name] = total, count
    else:
        total = torch.zeros(len(variants), dtype=torch.double)
        count = torch.zeros(len(variants), dtype=torch.double)
        for token in sorted({v.token for v in variants}):
            picked = [i for i, v in enumerate(variants) if v.token == token]
            candidates = []
            for candidate, weights in route(token):
                if candidate in memo:
                    nll, count[picked] = memo[candidate][0][picked], memo[candidate][1][picked]
                else:
                    with weights:
                        nll, count[picked] = example_nll(accelerator, scorer, [encoded[i] for i in picked], pad,
                                                         batch_size)
                candidates.append(nll)
            total[picked] = mixture_nll(torch.stack(candidates))
    if attribute:
        total, count = total.view(len(examples), len(tokens)), count.view(len(examples), len(tokens))
        own = torch.tensor([tokens.index(e.token) for e in examples])
        rows = torch.arange(len(examples))
        share = (total.argmin(dim=1) == own).double().mean().item()
        total, count = total[rows, own], count[rows, own]
    else:
        share = float("nan")
    ppl = math.exp(total.sum().item() / count.sum().item())
    seconds = time.perf_counter() - start
    return Scores(ppl, share, total.tolist(), [int(c) for c in count.tolist()], seconds,
                  seconds * _attribution_share(examples, tokens, encoded) if attribute else 0.0)


def _attribution_share(examples: list[Example], tokens: list[str], encoded: list[list[int]]) -> float:
    """The share of the scored positions that attribution adds: the variants with another speaker's token
    (`encoded`: every example under each of `tokens`, in that order). Without windows each variant has its
    utterance's length, so (C − 1) / C; with windows an utterance's own variant shares its window's row (the
    longest) and another's computes its own tokens only (`collate(branch=True)`)."""
    own: dict[object, int] = {}
    other = 0
    for k, seq in enumerate(encoded):
        example = examples[k // len(tokens)]
        window = getattr(seq, "window", None)
        if tokens[k % len(tokens)] == example.token:
            key = window if window is not None else k
            own[key] = max(own.get(key, 0), len(seq))
        else:
            other += len(seq) - (context_of(seq) if window is not None else 0)
    return other / (other + sum(own.values()))


class EarlierScores:
    """What earlier matrix rows scored, by task and weights fingerprint (`Router.weights_fingerprint`): a frozen
    column serves its task the same in every later row, so a row takes those scores instead of scoring again."""

    def __init__(self):
        self.kept: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.prints: dict[str, str] = {}

    def memo(self, router, tasks) -> dict[int, Scored]:
        """The row's memo (per task: weights name → scores), filled with what weights unchanged since scored."""
        names = {router.oracle_name(t.index) for t in tasks}
        names |= {name for t in tasks for token in t.tokens.values() for name, _ in router.named_choices(token)}
        prints = {name: router.weights_fingerprint(name) for name in names if name is not None}
        self.prints = {name: p for name, p in prints.items() if p is not None}
        return {t.index: {name: self.kept[t.index, p] for name, p in self.prints.items() if (t.index, p) in self.kept}
                for t in tasks}

    def keep(self, memo: dict[int, Scored]) -> None:
        """Keep a row's scores (the memo `memo()` gave, filled by the row) for the rows after it."""
        for task, scored in memo.items():
            for name, value in scored.items():
                if name in self.prints:
                    self.kept[task, self.prints[name]] = value


def test_row(ctx, router, tasks, settings, agnostic: bool = False,
             memo: dict[int, Scored] | None = None) -> list[Scores]:
    """One row of the matrix: each task's test scores. Oracle: each task served by the weights
    `router.oracle(task)` gives it, in one pass. `agnostic`: each utterance served by the weights its
    speaker token routes to. The whole row runs in one `fp32_arithmetic()` window (one upcast). `memo` (per
    task): the oracle row leaves its NLLs there by the name of their weights, and the agnostic row of the same
    model reuses them for a candidate of that name (a guest's own column scores it in both rows)."""
    memo = {} if memo is None else memo
    row = []
    with fp32_arithmetic(ctx.scorer):
        for task in tasks:
            row.append(_test_scores(ctx, router, task, settings, agnostic, memo.setdefault(task.index, {})))
    return row


def _test_scores(ctx, router, task, settings, agnostic: bool, memo: Scored) -> Scores:
    candidates = list(task.tokens.values()) if settings.attribution else []
    if agnostic:
        return score_split(ctx.accelerator, ctx.scorer, ctx.tokenizer, task.test, candidates, ctx.max_length,
                           settings.batch_size, route=router.named_choices, memo=memo)
    with router.oracle(task.index):
        return score_split(ctx.accelerator, ctx.scorer, ctx.tokenizer, task.test, candidates, ctx.max_length,
                           settings.batch_size, name=router.oracle_name(task.index), memo=memo)
