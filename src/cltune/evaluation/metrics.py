"""Continual-learning metrics of a perplexity matrix, as pure functions.

`ppl[i][j]` is the test perplexity of task j after phase i (row 0: before any training).
With L = ln ppl (lower is better) and T tasks:
  forgetting_pct[j] = 100 · (ppl[T][j] − ppl[j+1][j]) / ppl[j+1][j]      for j < T−1 (final vs just learned)
  peak_forgetting_pct[j] = 100 · max_{i>j+1} (ppl[i][j] − ppl[j+1][j]) / ppl[j+1][j]   (the worst rise over any
      later phase: Chaudhry et al. 2018's forgetting, on perplexity; a later similar task can hide a dip from
      forgetting_pct, never from this)
  BWT = mean_{j<T−1} (L[j+1][j] − L[T][j])   (negative: later phases hurt earlier tasks)
  FWT = mean_{j≥1}  (L[0][j] − L[j][j])     (positive: earlier phases already helped task j)
"""

from __future__ import annotations

import math


def _check(ppl: list[list[float]]) -> int:
    tasks = len(ppl[0])
    if len(ppl) != tasks + 1 or any(len(r) != tasks for r in ppl):
        raise ValueError(f"expected a {tasks + 1}×{tasks} matrix (row 0 = before training)")
    return tasks


def forgetting_pct(ppl: list[list[float]]) -> list[float]:
    t = _check(ppl)
    return [100 * (ppl[t][j] - ppl[j + 1][j]) / ppl[j + 1][j] for j in range(t - 1)]


def peak_forgetting_pct(ppl: list[list[float]]) -> list[float]:
    t = _check(ppl)
    return [100 * max(ppl[i][j] - ppl[j + 1][j] for i in range(j + 2, t + 1)) / ppl[j + 1][j] for j in range(t - 1)]


def bwt(ppl: list[list[float]]) -> float | None:
    t = _check(ppl)
    if t < 2:
        return None
    return sum(math.log(ppl[j + 1][j]) - math.log(ppl[t][j]) for j in range(t - 1)) / (t - 1)


def fwt(ppl: list[list[float]]) -> float | None:
    t = _check(ppl)
    if t < 2:
        return None
    return sum(math.log(ppl[0][j]) - math.log(ppl[j][j]) for j in range(1, t)) / (t - 1)


def summary(ppl: list[list[float]]) -> dict:
    forgetting, peak = forgetting_pct(ppl), peak_forgetting_pct(ppl)
    return {
        "forgetting_pct": forgetting,
        "max_forgetting_pct": max(forgetting) if forgetting else None,
        "peak_forgetting_pct": peak,
        "max_peak_forgetting_pct": max(peak) if peak else None,
        "bwt": bwt(ppl),
        "fwt": fwt(ppl),
        "avg_final_ppl": sum(ppl[-1]) / len(ppl[-1]),
    }
