"""Intervals for comparisons, as pure functions: a t-interval of a mean over seeds, a paired bootstrap
over test utterances of the difference in log-perplexity between two runs, and the paired interval
`cltune compare` reports (the wider of the two).

Both state their noise honestly for what `cltune compare` has: a handful of seeds (the t-interval
is wide with 2–3 of them, as it should be) and, per seed, one shared test split on which two
strategies can be compared utterance by utterance (the bootstrap resamples those utterances).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

# Two-sided 95% quantiles of Student's t by degrees of freedom (scipy is not a dependency).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
         25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (the next smaller tabled df above 20)."""
    if df < 1:
        raise ValueError("a t-interval needs at least two values")
    if df in _T975:
        return _T975[df]
    return _T975[max(d for d in _T975 if d <= df)] if df <= 120 else 1.960


def mean_interval(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of a 95% t-interval over `values` (one per seed); no interval from one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def log_ppl(nll: Sequence[float], targets: Sequence[int], picks: Sequence[int] | None = None) -> float:
    """ln PPL = Σ NLL / Σ targets over the utterances `picks` (all when None)."""
    picks = range(len(nll)) if picks is None else picks
    return sum(nll[i] for i in picks) / sum(targets[i] for i in picks)


def resamples(n: int, count: int, seed: int) -> list[list[int]]:
    """`count` seeded bootstrap resamples of `n` utterance positions (with replacement)."""
    rng = random.Random(seed)
    return [[rng.randrange(n) for _ in range(n)] for _ in range(count)]


def hierarchical_draws(sizes: Sequence[int], count: int, seed: int = 0) -> list[list[tuple[int, list[int]]]]:
    """`count` two-level resamples: seeds drawn with replacement, then each drawn seed's test utterances
    drawn with replacement. `sizes[i]` is seed i's number of test utterances. Each draw is a list of
    (seed index, utterance positions)."""
    rng = random.Random(seed)
    draws = []
    for _ in range(count):
        picked = [rng.randrange(len(sizes)) for _ in sizes]
        draws.append([(i, [rng.randrange(sizes[i]) for _ in range(sizes[i])]) for i in picked])
    return draws


def pooled_paired_differences(pairs: Sequence[tuple[tuple[Sequence[float], Sequence[int]],
                                                    tuple[Sequence[float], Sequence[int]]]],
                              draws: Sequence[Sequence[tuple[int, Sequence[int]]]]) -> tuple[float, list[float]]:
    """The mean over seeds of ln PPL(a) − ln PPL(b) (`pairs[i]` = (a, b) on seed i's shared test utterances),
    and that mean on each draw of `hierarchical_draws`: seed-to-seed variation and test-set noise both."""
    point = sum(log_ppl(*a) - log_ppl(*b) for a, b in pairs) / len(pairs)
    values = []
    for draw in draws:
        values.append(sum(log_ppl(*pairs[i][0], picks) - log_ppl(*pairs[i][1], picks) for i, picks in draw) / len(draw))
    return point, values


def percentile_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The central `confidence` share of `values` (nearest-rank percentiles)."""
    ordered = sorted(values)
    tail = (1 - confidence) / 2
    rank = lambda share: math.ceil(round(share * len(ordered), 9))  # noqa: E731 - round: 0.025·1000 is 25.000…02
    low = ordered[max(0, rank(tail) - 1)]
    high = ordered[min(len(ordered) - 1, rank(1 - tail) - 1)]
    return low, high


def paired_interval(pairs: Sequence[tuple[tuple[Sequence[float], Sequence[int]],
                                          tuple[Sequence[float], Sequence[int]]]],
                    count: int, seed: int = 0) -> tuple[float, float, float]:
    """(point, low, high) in ln PPL of a − b over seeds (`pairs[i]` = (a, b) on seed i's shared test utterances):
    the mean of the seeds' paired differences and the wider of two 95% intervals — `count` two-level bootstrap
    draws (seeds, then utterances: test-set noise) and, from two seeds on, a t-interval over the seeds' differences
    (each seed is one training run of each side, so their spread holds the runs' training noise, which a bootstrap
    over 2–3 seeds understates)."""
    point, values = pooled_paired_differences(pairs, hierarchical_draws([len(a[0]) for a, _ in pairs], count, seed))
    low, high = percentile_interval(values)
    if len(pairs) > 1:
        _, seeds_low, seeds_high = mean_interval([log_ppl(*a) - log_ppl(*b) for a, b in pairs])
        low, high = min(low, seeds_low), max(high, seeds_high)
    return point, low, high
