"""What a run's figures mean and whether they are good, in sentences: one source for the terminal summary
and the report. The conventions are those of `cltune.evaluation.metrics` (stated there as formulas)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cltune.evaluation.results import AgnosticRows, RunMetrics

# A change smaller than this (in %) prints as 0.0%: "unchanged", not "0.0% worse".
UNCHANGED_PCT = 0.05

ROUTING_LABELS = {
    "agnostic": "routed by speaker token",
    "oracle": "oracle task id",
    "single": "one model for every task",
}

PPL_MEANING = "exp of the mean negative log-likelihood per target token of held-out test utterances; lower is better"
FORGETTING_MEANING = ("Forgetting is the change of an earlier task's test perplexity from right after learning it to "
                      "the end, in %: positive is worse (forgetting), negative is better (later tasks helped).")
BWT_MEANING = ("BWT (backward transfer, log-PPL) = mean over the earlier tasks of ln PPL right after learning the "
               "task − ln PPL at the end: negative means later phases hurt earlier tasks (forgetting), positive "
               "that they helped.")
FWT_MEANING = ("FWT (forward transfer, log-PPL) = mean over tasks 2… of ln PPL before any training − ln PPL just "
               "before the task's own phase: positive means earlier phases already helped it, negative that they "
               "made it harder.")


def routing_label(routing: str) -> str:
    return ROUTING_LABELS.get(routing, routing)


def change_words(pct: float) -> str:
    """An earlier task's perplexity change since right after learning it, as a verdict."""
    if abs(pct) < UNCHANGED_PCT:
        return "unchanged since right after learning it (0.0%)"
    if pct > 0:
        return f"{pct:.1f}% worse than right after learning it (forgetting)"
    return f"{-pct:.1f}% better than right after learning it (later tasks helped)"


def forgetting_lines(tasks: list[str], rows: RunMetrics | AgnosticRows) -> list[str]:
    """One sentence per earlier task: the verdict, the perplexities it comes from, and the worst later phase
    when that differs from the end."""
    if not rows.forgetting_pct:
        return []
    learned = [rows.ppl[j + 1][j] for j in range(len(rows.forgetting_pct))]
    peak = rows.peak_forgetting_pct or rows.forgetting_pct
    lines = []
    for task, pct, worst, start, end in zip(tasks, rows.forgetting_pct, peak, learned, rows.ppl[-1]):
        line = f"{task}: {change_words(pct)}; test PPL {start:.2f} → {end:.2f}"
        if abs(worst - pct) >= UNCHANGED_PCT:
            line += f"; at its worst after a later phase (peak): {_pct_words(worst)}"
        lines.append(line)
    return lines


def _pct_words(pct: float) -> str:
    if abs(pct) < UNCHANGED_PCT:
        return "unchanged"
    return f"{abs(pct):.1f}% {'worse' if pct > 0 else 'better'}"


def _ratio_words(log_change: float) -> str:
    """A mean change of ln PPL as a perplexity factor (a geometric mean over tasks)."""
    factor = math.exp(log_change)
    return f"perplexity ×{factor:.3f}, {abs(factor - 1) * 100:.1f}% {'higher' if factor > 1 else 'lower'}"


def _negligible(log_change: float) -> bool:
    """A change of ln PPL whose perplexity factor prints as 0.0%, as `change_words` calls unchanged."""
    return abs(math.expm1(log_change)) * 100 < UNCHANGED_PCT


def bwt_words(bwt: float | None) -> str | None:
    if bwt is None:
        return None
    if _negligible(bwt):
        verdict = "later phases left the earlier tasks' perplexity unchanged"
    elif bwt < 0:
        verdict = f"later phases hurt the earlier tasks ({_ratio_words(-bwt)} at the end than right after learning)"
    else:
        verdict = f"later phases helped the earlier tasks ({_ratio_words(-bwt)} at the end than right after learning)"
    return f"BWT {bwt:+.4f}: {verdict}."


def fwt_words(fwt: float | None) -> str | None:
    if fwt is None:
        return None
    if _negligible(fwt):
        verdict = "earlier phases left the later tasks where the untrained model had them"
    elif fwt > 0:
        verdict = (f"earlier phases already helped the later tasks before their own phase ({_ratio_words(-fwt)} "
                   "than the untrained model's)")
    else:
        verdict = (f"earlier phases made the later tasks harder before their own phase ({_ratio_words(-fwt)} "
                   "than the untrained model's)")
    return f"FWT {fwt:+.4f}: {verdict}."


def final_ppl_words(rows: RunMetrics | AgnosticRows, tasks: list[str]) -> str | None:
    if not rows.ppl:
        return None
    final = rows.ppl[-1]
    average = sum(final) / len(final)
    each = ", ".join(f"{t} {v:.2f}" for t, v in zip(tasks, final))
    return f"Test perplexity (PPL: {PPL_MEANING}) after the last phase: {each}; average {average:.2f}."


def speakers_per_task(metrics: RunMetrics, eda: dict | None = None) -> dict[str, int]:
    """How many speakers each dataset has (attribution's candidates): from the EDA when read, else from the
    samples (one per speaker of each task); a task neither names is left out."""
    if eda is not None:
        return {d["name"]: len(d["speaker_share"]) for d in eda["datasets"]}
    seen: dict[str, set[str]] = {}
    for sample in metrics.samples:
        seen.setdefault(sample.task, set()).add(sample.speaker)
    return {task: len(speakers) for task, speakers in seen.items()}


def chance_words(count: int | None) -> str:
    if not count:
        return "chance: 1 in the dataset's number of speakers"
    return f"chance {100 / count:.0f}% with {count} speakers"


def attribution_words(tasks: list[str], row: list[float | None], speakers: dict[str, int]) -> str | None:
    """Attribution of the last row as percentages, each beside its chance level (a random pick of a speaker)."""
    parts = [f"{task} {100 * v:.1f}% ({chance_words(speakers.get(task))})"
             for task, v in zip(tasks, row) if v is not None]
    if not parts:
        return None
    return ("Speaker attribution after the last phase (share of test utterances whose text is most likely after "
            "their true speaker's token; higher is better): " + ", ".join(parts) + ".")


def routing_caption(metrics: RunMetrics, routing: str, router: dict | None = None) -> str:
    """How the matrix with `routing` was scored, from metrics.json's routing and, when read, the last
    checkpoint's router.json (the same router the evaluation used)."""
    if routing == "oracle":
        unit = "column" if (router or {}).get("kind") == "progressive" else "adapter"
        return (f"Each dataset is evaluated with its own {unit}: the task id is given (oracle), which a user of the "
                "saved model does not have; the headline figures use the matrix routed by speaker token.")
    if routing == "agnostic":
        return _agnostic_caption(metrics, router)
    kind = (router or {}).get("kind", "single")
    if kind == "fusion":
        adapters = router.get("adapters", [])
        return (f"One model serves every dataset: a learned gate mixes the {len(adapters)} task adapters token by "
                "token, from what the model has read so far — no task id, no speaker routing.")
    if kind == "fixed":  # merge's router: its merged adapter ("merged", strategies/merge.py), or task 1's before it
        what = "the per-task adapters merged" if router.get("adapter") == "merged" else "the first task's adapter"
        return f"One adapter (`{router.get('adapter')}`, {what}) serves every dataset — no task id, no routing."
    return "The same weights serve every dataset: no task id, no routing."


def _agnostic_caption(metrics: RunMetrics, router: dict | None) -> str:
    lead = ("Each test utterance is served by the weights its speaker token routes to (no task id), as "
            "`cltune generate` does")
    routes = (router or {}).get("routes")
    if not routes:
        return lead + "."
    unit = "column" if router.get("kind") == "progressive" else "adapter"
    owner: dict[str, str] = {}  # adapter → the first task it serves by task id (its own)
    for adapter, task in zip(router.get("tasks", []), metrics.tasks):
        if adapter is not None:
            owner.setdefault(adapter, task)
    names = {token: name for name, token in metrics.speaker_tokens.items()}
    mode = router.get("shared_speakers")
    parts = []
    for token, candidates in routes.items():
        candidates = [candidates] if isinstance(candidates, str) else list(candidates)
        who = f"{names[token]} `{token}`" if token in names else f"`{token}`"
        served = [f"{owner.get(a, a)}'s" for a in candidates]
        if len(candidates) == 1:
            parts.append(f"{who} → {served[0]} {unit}")
        elif mode in ("likelihood", "validated"):  # validated: candidates before a phase has chosen
            parts.append(f"{who} → an equal-prior mixture of {' and '.join(served)} {unit}s (the mean of their "
                         "likelihoods, each token predicted from the ones before it)")
        else:
            parts.append(f"{who} → {served[-1]} {unit} (the latest task with that speaker)")
    chosen = "" if mode != "validated" else (
        f" Each speaker's route was chosen after the phase — its own {unit}, a later one or their mixture — by the "
        "lowest perplexity on its validation utterances (the learned tasks' validation splits).")
    return lead + ". After the last phase: " + "; ".join(parts) + "." + chosen


@dataclass
class Summary:
    """The sentences of a run's summary, for the rows it is scored by; the terminal and the report format them."""

    scored_by: str  # "routed by speaker token", ...
    caption: str  # how those rows are served
    final: str | None = None
    forgetting: list[str] = field(default_factory=list)  # one verdict per earlier task
    transfer: list[tuple[str, str]] = field(default_factory=list)  # (BWT/FWT verdict, its definition)
    with_task_id: str | None = None  # the oracle verdicts, when the headline rows are the routed ones
    attribution: str | None = None


def run_summary(metrics: RunMetrics, eda: dict | None = None, router: dict | None = None) -> Summary:
    """What each figure means and whether it is good, for the rows the run is scored by (speaker-routed when its
    matrix needed the task id)."""
    rows, routing = metrics.scored()
    out = Summary(routing_label(routing), routing_caption(metrics, routing, router),
                  final=final_ppl_words(rows, metrics.tasks), forgetting=forgetting_lines(metrics.tasks, rows))
    if out.forgetting:
        out.transfer = [(words, meaning) for words, meaning in ((bwt_words(rows.bwt), BWT_MEANING),
                                                                (fwt_words(rows.fwt), FWT_MEANING)) if words]
    if routing == "agnostic" and metrics.forgetting_pct:
        out.with_task_id = (f"With the task id given ({routing_label('oracle')}, which users do not have): "
                            + "; ".join(forgetting_lines(metrics.tasks, metrics)) + ".")
    if rows.speaker_attribution:
        out.attribution = attribution_words(metrics.tasks, rows.speaker_attribution[-1],
                                            speakers_per_task(metrics, eda))
    return out
