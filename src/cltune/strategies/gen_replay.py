"""`gen_replay`: generative replay — before each later phase the current model writes
pseudo-utterances for every earlier dataset's speakers (prompted by the speaker token alone),
and those are mixed into the phase's training data like replay. No earlier utterance is kept.

Per earlier dataset the count is `per_task`, or `ratio` × its training-split size; it is shared
among that dataset's speakers in proportion to their training utterances (largest remainder),
so the pseudo-data keeps the dataset's speaker balance. Empty samples are dropped, not redrawn.
Every sample is written to RUN/gen_replay/before_phaseK.jsonl — outside the phase folders,
which the checkpoint code replaces as a whole at phase end.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass

from accelerate.utils import broadcast_object_list
from pydantic import Field

from cltune.config import Strict
from cltune.data.split import Example, Split, TaskData
from cltune.modeling.generate import sample_utterances
from cltune.storage.files import atomic_write_text
from cltune.strategies.base import Costs, Strategy

GENERATED_LINE = -1  # Example.line of a generated utterance: it comes from no file row


class GenReplaySettings(Strict):
    ratio: float = Field(
        0.1, ge=0, le=1, description="pseudo-utterances per earlier dataset, as a share of its training split")
    per_task: int | None = Field(
        None, ge=1, description="fixed pseudo-utterances per earlier dataset (overrides ratio)")
    temperature: float = Field(
        0.8, ge=0, description="sampling temperature; 0 = greedy (every sample of a speaker alike)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling mass")
    max_new_tokens: int = Field(40, ge=1, description="tokens generated per pseudo-utterance at most")
    batch_size: int = Field(32, ge=1, description="sequences generated per forward pass; a speed knob, same samples")


@dataclass(frozen=True)
class Draw:
    """How many pseudo-utterances to sample for one speaker of one earlier dataset."""

    task: int
    speaker: str
    token: str
    count: int


def task_quota(train_size: int, ratio: float, per_task: int | None) -> int:
    """Pseudo-utterances for a dataset: `per_task`, else ratio × train size (≥ 1 when ratio > 0)."""
    if per_task is not None:
        return per_task
    if ratio <= 0 or train_size == 0:
        return 0
    return max(1, round(ratio * train_size))


def speaker_quotas(counts: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` in proportion to `counts` by largest remainder; ties go to the earlier key."""
    weight = sum(counts.values())
    if weight == 0 or total == 0:
        return {s: 0 for s in counts}
    exact = {s: total * c / weight for s, c in counts.items()}
    quotas = {s: math.floor(x) for s, x in exact.items()}
    rank = {s: i for i, s in enumerate(counts)}
    order = sorted(counts, key=lambda s: (quotas[s] - exact[s], rank[s]))
    for s in order[: total - sum(quotas.values())]:
        quotas[s] += 1
    return quotas


def plan_draws(earlier: list[TaskData], ratio: float, per_task: int | None) -> list[Draw]:
    """The draws before a phase: per earlier dataset, its quota shared among its speakers.

    Only the training split's size and speaker counts are read, never an utterance's text.
    """
    draws = []
    for task in earlier:
        counts = Counter(e.speaker for e in task.train)
        quotas = speaker_quotas({s: counts[s] for s in task.speakers}, task_quota(len(task.train), ratio, per_task))
        draws += [Draw(task.index, s, task.tokens[s], n) for s, n in quotas.items() if n > 0]
    return draws


def draw_seed(seed: int, phase: int, draw: Draw) -> int:
    """A seed per (run seed, phase, dataset, speaker): a draw does not shift when another changes."""
    return random.Random(f"{seed}|{phase}|{draw.task}|{draw.speaker}").randrange(2**31)


class GenReplay(Strategy):
    name = "gen_replay"
    summary = ("generative replay: the model samples pseudo-utterances of earlier speakers (10% per dataset) "
               "for later phases")
    sections = {"gen_replay": GenReplaySettings}
    phase1_neutral = True

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.cfg: GenReplaySettings = settings["gen_replay"]
        self.pseudo: list[Example] = []

    def before_task(self, task: TaskData, *, resumed: bool = False) -> Costs | None:
        # Regenerated from the current model before every later phase (the samples are a
        # function of the weights and the seed), so nothing has to survive a restart: state() stays empty.
        self.pseudo = []
        if task.index == 0:
            return None
        phase = task.index + 1
        start = time.perf_counter()
        rows = self._generate(plan_draws(self.ctx.tasks[: task.index], self.cfg.ratio, self.cfg.per_task), phase)
        kept = [r for r in rows if r["text"]]
        self.pseudo = [Example(r["task_index"], r["speaker"], r["token"], r["text"], Split.TRAIN, GENERATED_LINE)
                       for r in kept]
        costs = {"generation_wall_s": round(time.perf_counter() - start, 2), "sampled": len(rows),
                 "kept": len(kept), "dropped_empty": len(rows) - len(kept)}
        if self.ctx.run_dir is not None and self.ctx.accelerator.is_main_process:
            text = "".join(json.dumps({"phase": phase, **r}, ensure_ascii=False) + "\n" for r in kept)
            atomic_write_text(self.ctx.run_dir / "gen_replay" / f"before_phase{phase}.jsonl", text)
        return costs

    def _generate(self, draws: list[Draw], phase: int) -> list[dict]:
        """Sample on the main process and broadcast, so every process trains on identical data."""
        acc, cfg = self.ctx.accelerator, self.cfg
        rows: list[dict] = []
        if acc.is_main_process:
            for draw in draws:
                texts = sample_utterances(
                    self.ctx.model, self.ctx.tokenizer, draw.token, draw.count, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, top_p=cfg.top_p, seed=draw_seed(self.ctx.seed, phase, draw),
                    batch_size=cfg.batch_size,
                )
                task = self.ctx.tasks[draw.task]
                rows += [{"task": task.name, "task_index": draw.task, "speaker": draw.speaker, "token": draw.token,
                          "text": t}
                         for t in texts]
        if acc.num_processes > 1:
            holder = [rows]
            broadcast_object_list(holder)
            rows = holder[0]
        return rows

    def train_data(self, task: TaskData) -> list[Example]:
        return task.train + self.pseudo


STRATEGY = GenReplay
