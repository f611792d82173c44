"""The typed, versioned contents of RUN/metrics.json: written by the pipeline, read by the report,
the sweep, resume and comparisons. Field meanings are in docs/reference/metrics.md.

Version history: 1 — the untyped dict (no `schema_version` key); 2 — this model (same keys, plus
`schema_version`). Version 1 files still load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cltune.errors import UserError
from cltune.evaluation import metrics as cl_metrics
from cltune.storage.files import write_json

SCHEMA_VERSION = 2


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sample(_Record):
    phase: int
    task: str
    speaker: str
    token: str
    text: str  # the model's generation
    # With context turns: the test utterance's earlier turns ([speaker, text], oldest first) the generation
    # answers, and the utterance itself (the true reply)
    context: list[list[str]] = Field(default_factory=list)
    reference: str | None = None


class PhaseRecord(_Record):
    phase: int  # 1-based
    task: str
    steps: int
    target_tokens: int
    wall_s: float
    tokens_per_s: float
    best_val_loss: float | None
    stopped_early: bool
    # times the loss guard took the weights back and halved the learning rates (a rising training loss)
    loss_guard_backoffs: int = 0
    train_examples: int | None  # utterances the phase trained on (None: a reused phase-1 checkpoint)
    before: dict[str, float]  # val_ppl, test_ppl of this phase's task before training
    after: dict[str, float]
    strategy: dict[str, Any] = Field(default_factory=dict)  # hooks_s and the strategy's own costs


class AgnosticRows(_Record):
    """The matrix again with every test utterance served by the weights its speaker token routes to
    (no task id: what a user of the saved model gets), and its forgetting figures."""

    ppl: list[list[float]] = Field(default_factory=list)
    speaker_attribution: list[list[float | None]] = Field(default_factory=list)
    forgetting_pct: list[float] | None = None
    max_forgetting_pct: float | None = None
    peak_forgetting_pct: list[float] | None = None
    max_peak_forgetting_pct: float | None = None
    bwt: float | None = None
    fwt: float | None = None
    avg_final_ppl: float | None = None


class RunMetrics(_Record):
    schema_version: int = SCHEMA_VERSION
    run: str
    strategy: str
    model: str
    precision: str  # what training ran in: fp32, bf16 or fp16
    eval_precision: str = "fp32"  # what evaluation ran in: fp32, or the training precision (`eval.precision: run`)
    processes: int
    # "single": one model serves every task, the matrix needs no task id. "oracle": the matrix gives each
    # task its own weights (the task id, which users do not have); `agnostic` holds the speaker-routed matrix.
    routing: str = "single"
    # The strategy's own config sections (e.g. ewc and replay for ewc_replay), so a report can show its settings
    # without importing the strategies; None in files written before it was recorded.
    settings_sections: list[str] | None = None
    tasks: list[str]
    speaker_tokens: dict[str, str]
    parameters: dict[str, int]
    split_sizes: list[dict[str, int]]
    # earlier turns shown before each utterance (`data.context_turns`; "all": whole conversations in windows)
    context_turns: int | Literal["all"] = 0
    # The process's peak resident memory when the last phase ended (per run when each run has its own
    # process, as under `cltune compare`; in a notebook, the notebook's peak so far).
    peak_rss_mb: float | None = None
    adapter_params: int | None = None  # LoRA and token-row parameters the model holds at the end (every adapter)
    # Seconds per stage of the run: load, train, evaluate, attribution, hooks, samples, save, report
    # (`cltune.training.session.Stages`); a resumed run adds its own to the interrupted one's finished phases.
    stages_s: dict[str, float] | None = None
    ppl: list[list[float]] = Field(default_factory=list)  # ppl[i][j]: task j after phase i (row 0: before training)
    speaker_attribution: list[list[float | None]] = Field(default_factory=list)
    phases: list[PhaseRecord] = Field(default_factory=list)
    samples: list[Sample] = Field(default_factory=list)
    forgetting_pct: list[float] | None = None  # final vs just learned (the reference pipeline's convention)
    max_forgetting_pct: float | None = None
    peak_forgetting_pct: list[float] | None = None  # worst rise over any later phase (Chaudhry et al. 2018)
    max_peak_forgetting_pct: float | None = None
    bwt: float | None = None
    fwt: float | None = None
    avg_final_ppl: float | None = None
    agnostic: AgnosticRows | None = None

    @property
    def complete(self) -> bool:
        return len(self.ppl) == len(self.tasks) + 1

    def scored(self) -> tuple[RunMetrics | AgnosticRows, str]:
        """The rows the run's headline figures come from, and their routing ("single", "oracle" or "agnostic"): a
        matrix that needed the task id is scored by its speaker-routed rows, what a user of the saved model gets."""
        if self.routing == "oracle" and self.agnostic is not None and self.agnostic.ppl:
            return self.agnostic, "agnostic"
        return self, self.routing

    def with_summary(self) -> RunMetrics:
        """The forgetting, BWT/FWT and final-average figures, once every phase has its row."""
        if not self.complete:
            return self
        agnostic = self.agnostic
        if agnostic is not None and len(agnostic.ppl) == len(self.ppl):
            agnostic = agnostic.model_copy(update=cl_metrics.summary(agnostic.ppl))
        return self.model_copy(update={**cl_metrics.summary(self.ppl), "agnostic": agnostic})

    def to_json(self) -> dict:
        return self.model_dump(mode="json")

    def write(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def read(cls, path: str | Path) -> RunMetrics:
        """A metrics.json of any supported version; a damaged or foreign file is a one-line UserError."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: not found; is this a run folder?") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: not readable JSON ({type(err).__name__}); "
                            "rerun the run or restore the file") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object of run metrics")
        version = data.setdefault("schema_version", 1)
        if version not in (1, SCHEMA_VERSION):
            raise UserError(f"{path}: metrics schema version {version!r} is not one this cltune reads "
                            f"(1–{SCHEMA_VERSION}); upgrade cltune")
        try:
            return cls.model_validate({**data, "schema_version": SCHEMA_VERSION})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise UserError(f"{path}: {where}: {first['msg']}; the file is damaged or not cltune's") from None
