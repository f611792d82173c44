"""A whole continual-learning stream from one config: session → phases → RUN/metrics.json.

Each phase writes RUN/phaseK/ (adapter, tokenizer, router, resolved config, train log, phase
record); RUN/metrics.json (`RunMetrics`) holds the perplexity matrix and every derived metric,
rewritten after each phase. During a phase RUN/steps/phaseK/ holds its latest step checkpoints.
`resume=True` skips the phases that metrics.json records, restores the last one's checkpoint and
strategy state, and continues the next phase from its latest step checkpoint; the result equals
an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import set_seed
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from cltune.config import BaseRunConfig, dump_config
from cltune.data import Example, TaskData
from cltune.data.eda import TokenCounter, summarize, write_eda
from cltune.evaluation.evaluate import Scores, perplexity, test_row
from cltune.evaluation.results import AgnosticRows, PhaseRecord, RunMetrics, Sample
from cltune.modeling.checkpoint import save_checkpoint, verify
from cltune.modeling.generate import sample_rows
from cltune.modeling.memory import peak_rss_mb
from cltune.modeling.model import adapter_parameters, settle_dtypes
from cltune.storage.files import atomic_write_text, read_json, write_json
from cltune.storage.hashing import derived_seed
from cltune.storage.runlock import claim, main_process
from cltune.strategies.base import Costs, Router
from cltune.strategies.routing import ROUTER_FILE
from cltune.training import resume as resuming
from cltune.training import rundir
from cltune.training.loop import PhaseResult, served_fingerprint, train_phase
from cltune.training.session import Session, build_session
from cltune.training.tracking import flat_settings, phase_scalars

log = logging.getLogger(__name__)
TEST_NLL = "test_nll.json"  # the latest row's per-utterance test NLLs, for paired comparisons (cltune compare)


def _prepare_run_dir(session: Session, resolved: str, inputs: list[dict], fresh: bool) -> None:
    """Main process: the resolved config and EDA; a fresh run also forgets an earlier run's progress."""
    config, tokenizer = session.config, session.tokenizer
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        rundir.start_fresh(run_dir, inputs)
    atomic_write_text(run_dir / "config.resolved.yaml", resolved)
    summaries = [summarize(d, TokenCounter(tokenizer), config.data.max_length,
                           task) for d, task in zip(session.datasets, session.tasks)]
    write_eda(summaries, run_dir / "eda", f"{config.model.name} tokenizer", config.data.max_length)


def _header(session: Session) -> RunMetrics:
    config = session.config
    return RunMetrics(
        run=config.name, strategy=config.strategy, model=config.model.name, precision=session.precision,
        eval_precision="fp32" if config.eval.precision == "fp32" else session.precision,
        processes=session.accelerator.num_processes, tasks=[t.name for t in session.tasks],
        speaker_tokens=session.speaker_tokens, parameters=session.counts,
        split_sizes=[{"train": len(t.train), "val": len(t.val), "test": len(t.test)} for t in session.tasks],
        context_turns=config.data.context_turns, settings_sections=list(session.strategy.sections),
    )


def run_stream(config: BaseRunConfig, *, reuse_phase1: Path | None = None, console=None, resume: bool = False,
               log_with: Sequence[str] = ()) -> RunMetrics:
    """Hold the run folder, build the session `config` describes and `run` it; the trackers are closed after.
    `log_with`: Accelerate trackers to log to (`cltune.training.tracking`)."""
    with claim(config.run_dir, enabled=main_process()):  # one run per run folder at a time
        session = build_session(config, log_with=log_with)
        try:
            return run(session, reuse_phase1=reuse_phase1, console=console, resume=resume)
        finally:
            session.accelerator.end_training()


def run(session: Session, *, reuse_phase1: Path | None = None, console=None, resume: bool = False) -> RunMetrics:
    """Run the stream of a freshly built session (or, with `resume`, continue the one its run folder holds);
    returns the metrics also written to RUN/metrics.json. `reuse_phase1`: a finished phase-1 checkpoint of
    the same phase-1 settings, loaded instead of training phase 1."""
    config = session.config
    acc, ctx, strategy = session.accelerator, session.ctx, session.strategy
    resolved, inputs = dump_config(config), rundir.input_hashes(config)
    saved = rundir.saved_progress(config.run_dir, resolved, inputs) if resume else None
    if saved is not None and saved.phases:  # verified and loaded before anything in the folder is rewritten
        resuming.restore_phase(ctx, strategy, config.run_dir / f"phase{len(saved.phases)}")
        settle_dtypes(ctx.model, ctx.base_dtype)
    # --resume on a folder that holds no run yet starts one (and records its inputs); otherwise a resumed
    # run keeps its step checkpoints. Every process has read the saved state before the main one rewrites it.
    fresh = not resume or not rundir.holds_run(config.run_dir)
    acc.wait_for_everyone()
    if acc.is_main_process:
        with session.stages.timed("load"):
            _prepare_run_dir(session, resolved, inputs, fresh=fresh)
    if acc.log_with:  # after a fresh run has cleared an earlier run's logs (trackers live on the main process)
        acc.init_trackers(config.name, config=flat_settings(config.model_dump(mode="json")))

    metrics = _header(session)
    if saved is not None and saved.phases:  # finished phases are not retrained: their rows come from metrics.json
        metrics = metrics.model_copy(update={k: getattr(saved, k)
                                             for k in ("ppl", "speaker_attribution", "phases", "samples",
                                                       "routing", "agnostic")})
        for stage, seconds in (saved.stages_s or {}).items():  # the finished phases' time counts too
            session.stages.add(stage, seconds)
    else:
        metrics, _ = _with_row(metrics, session, strategy.router())
    if console and acc.is_main_process:
        counts = session.counts
        console.print(f"[bold]{config.name}[/]: {len(session.tasks)} tasks, strategy {config.strategy}, "
                      f"LoRA {counts['lora']:,} + token rows {counts['new_token_rows']:,} trainable of "
                      f"{counts['total']:,}, {session.precision} training"
                      + (f"; resuming after phase {len(metrics.phases)}" if metrics.phases else ""))
    first = len(metrics.phases)
    for task in session.tasks[first:]:
        metrics = run_phase(session, task, metrics, resolved, reuse_phase1=reuse_phase1 if task.index == 0 else None,
                            resume=resume and task.index == first)
    return metrics.with_summary()  # a resumed run that was already complete has no phase left to summarize it


@dataclass
class Phase:
    """One phase on its way through `run_phase`: what each step reads and what it adds."""

    task: TaskData
    staging_log: Path  # RUN/.phaseK.train_log.jsonl, the loop's log until the phase checkpoint takes it
    meta: dict  # the checkpoint metadata of the phase and of its step checkpoints
    step_offset: int  # optimizer steps of earlier phases (trackers count over the whole stream)
    passes_at_start: tuple[int, int]  # the scorer's forward/backward token counters as the phase began
    checkpoints: resuming.StepCheckpoints | None = None
    reuse: Path | None = None  # a phase-1 checkpoint standing in for training
    hooks_s: dict = field(default_factory=dict)  # seconds in before_task and after_task
    costs: Costs = field(default_factory=dict)  # what the strategy's hooks reported
    before: dict = field(default_factory=dict)  # val and test PPL of the model the phase starts from
    passes: dict = field(default_factory=dict)  # model passes outside evaluation, and the loop's share
    router: Router | None = None  # what serves after consolidation: the new row, the samples, router.json


def run_phase(session: Session, task: TaskData, metrics: RunMetrics, resolved: str, *, reuse_phase1: Path | None = None,
              resume: bool = False) -> RunMetrics:
    """Phase `task.index + 1`: strategy hooks around training, a new matrix row, the phase checkpoint."""
    phase = _open(session, task, metrics, reuse_phase1, resume)
    examples = _set_up(session, phase)
    result = _train(session, phase, examples)
    _consolidate(session, phase)
    metrics, per_utterance, after = _score(session, phase, metrics, result)
    metrics = _record(session, phase, metrics, result, after, train_examples=None if phase.reuse else len(examples))
    return _save(session, phase, metrics, resolved, per_utterance)


def _open(session: Session, task: TaskData, metrics: RunMetrics, reuse: Path | None, resume: bool) -> Phase:
    """The phase's bookkeeping: a clean staging log, its seed, its step checkpoints (none when reused)."""
    config, k = session.config, task.index
    staging_log = config.run_dir / f".phase{k + 1}.train_log.jsonl"
    if session.accelerator.is_main_process:  # the one writer of the log; another process must not unlink it under it
        staging_log.unlink(missing_ok=True)
    set_seed(derived_seed(config.seed, k, "before_task"))  # the same draws whether or not resumed
    meta = {"model": config.model.model_dump(), "phase": k + 1, "task": task.name,
            "speaker_tokens": session.speaker_tokens,
            "context_turns": config.data.context_turns, "max_length": config.data.max_length, "start_token": True,
            "tasks": [{"name": t.name, "speakers": t.speakers} for t in session.tasks]}
    checkpoints = None if reuse is not None else resuming.StepCheckpoints(
        resuming.steps_folder(config.run_dir, k), config.phase(k).checkpoint_every,
        config.phase(k).save_total_limit, meta, resume=resume)
    scorer = session.ctx.scorer
    return Phase(task, staging_log, meta, step_offset=sum(p.steps for p in metrics.phases),
                 passes_at_start=(scorer.forward_tokens, scorer.backward_tokens), checkpoints=checkpoints, reuse=reuse)


def _set_up(session: Session, phase: Phase) -> list[Example]:
    """`before_task`, the phase's training data, and the figures of the model it starts from.

    Continuing from a step checkpoint, which restores the trained weights, `before_task` is told so (work
    whose only product is those weights, Reptile's meta-training, is skipped), and the start figures, set-up
    passes, costs and hook time are the interrupted process's, recorded with the checkpoint."""
    ctx, strategy, task = session.ctx, session.strategy, phase.task
    setup = phase.checkpoints.latest_setup() if phase.checkpoints else None
    with session.stages.timed("hooks"):
        start = time.perf_counter()
        phase.costs = dict(strategy.before_task(task, resumed=setup is not None) or {})
        settle_dtypes(ctx.model, ctx.base_dtype)  # an adapter it added came in the base's dtype
        phase.hooks_s = {"before_task": round(time.perf_counter() - start, 2)}
    examples = strategy.train_data(task)  # once per phase
    if setup is not None:
        phase.before, phase.hooks_s = setup["before"], setup["hooks_s"]
        phase.costs = {**phase.costs, **setup["costs"]}
        ctx.scorer.forward_tokens, ctx.scorer.backward_tokens = (
            p + q for p, q in zip(phase.passes_at_start, setup["passes"]))
    else:
        with session.stages.timed("evaluate"):
            phase.before = _start_figures(session, task)
    if phase.checkpoints is not None:
        loop_start = (ctx.scorer.forward_tokens, ctx.scorer.backward_tokens)
        phase.checkpoints.setup = {"before": phase.before, "hooks_s": phase.hooks_s, "costs": phase.costs,
                                   "passes": [now - then for now, then in zip(loop_start, phase.passes_at_start)]}
    return examples


def _start_figures(session: Session, task: TaskData) -> dict:
    """Validation and test PPL of the model the phase starts from (before_task may have changed it: an adapter
    added, meta-training), served as the matrix serves this task."""
    config, acc, ctx, strategy = session.config, session.accelerator, session.ctx, session.strategy
    with strategy.router().oracle(task.index):
        before = {"val_ppl": perplexity(acc, ctx.scorer, ctx.tokenizer, task.val, ctx.max_length,
                                        config.eval.batch_size)}
        fingerprint, measured, name = session.served.get(task.index, (None, None, None))
        # Most strategies start a phase from the model the last matrix row scored, and per-task adapters and
        # columns from a copy of the weights that served this task there: that row's figure is reused.
        # The name first: hashing every adapter weight costs a tenth of a second with several columns.
        same = (name is not None and name == strategy.starts_as(task)) or (
            fingerprint == served_fingerprint(ctx.model, strategy))
        before["test_ppl"] = measured if same else perplexity(
            acc, ctx.scorer, ctx.tokenizer, task.test, ctx.max_length, config.eval.batch_size)
    return before


def _train(session: Session, phase: Phase, examples: list[Example]) -> PhaseResult:
    """The training loop on `examples` (or the reused phase-1 checkpoint); counts the loop's model passes."""
    ctx, k, scorer = session.ctx, phase.task.index, session.ctx.scorer
    loop_start = (scorer.forward_tokens, scorer.backward_tokens)
    if phase.reuse is not None:
        main = session.accelerator.is_main_process
        with session.stages.timed("load"):
            result = _reuse_phase(phase.reuse, ctx.model, phase.staging_log if main else None)
    else:
        result = train_phase(ctx, session.strategy, phase.task, examples, session.config.phase(k), k,
                             phase.staging_log, phase.checkpoints, phase.step_offset)
        session.stages.add("train", result.wall_s - result.validation_s - result.checkpoint_s)
        session.stages.add("evaluate", result.validation_s)
        session.stages.add("save", result.checkpoint_s)
    phase.passes = {"training_forward_tokens": scorer.forward_tokens - loop_start[0],
                    "training_backward_tokens": scorer.backward_tokens - loop_start[1]}
    return result


def _consolidate(session: Session, phase: Phase) -> None:
    """`after_task` (Fisher, memory, merging), its time and costs; the phase's model passes outside evaluation."""
    ctx, scorer = session.ctx, session.ctx.scorer
    with session.stages.timed("hooks"):
        start = time.perf_counter()
        phase.costs = {**phase.costs, **(session.strategy.after_task(phase.task) or {})}
        settle_dtypes(ctx.model, ctx.base_dtype)
        phase.hooks_s["after_task"] = round(time.perf_counter() - start, 2)
    phase.passes = {"forward_tokens": scorer.forward_tokens - phase.passes_at_start[0],
                    "backward_tokens": scorer.backward_tokens - phase.passes_at_start[1], **phase.passes}
    if phase.reuse is not None:  # the training of the phase it stands for counts, as its wall time does
        source = read_json(phase.reuse / "metrics.json").get("strategy", {})
        trained = [source.get(f"training_{key}", source.get(key)) for key in ("forward_tokens", "backward_tokens")]
        phase.passes = {"forward_tokens": None, "backward_tokens": None} if None in trained else {
            "forward_tokens": phase.passes["forward_tokens"] + trained[0],
            "backward_tokens": phase.passes["backward_tokens"] + trained[1],
            "training_forward_tokens": trained[0], "training_backward_tokens": trained[1]}


def _score(session: Session, phase: Phase, metrics: RunMetrics, result: PhaseResult) -> tuple[RunMetrics, dict, dict]:
    """The matrix's next row (and its per-utterance NLLs), and the phase task's figures after training."""
    config, acc, ctx, strategy, task = session.config, session.accelerator, session.ctx, session.strategy, phase.task
    phase.router = strategy.router()
    metrics, per_utterance = _with_row(metrics, session, phase.router)
    with phase.router.oracle(task.index), session.stages.timed("evaluate"):
        # The loop's last validation scored these very weights unless early stopping or after_task changed them.
        validated, val_ppl = result.last_val or (None, None)
        after = {"val_ppl": val_ppl if validated == served_fingerprint(ctx.model, strategy) else perplexity(
            acc, ctx.scorer, ctx.tokenizer, task.val, ctx.max_length, config.eval.batch_size),
            "test_ppl": metrics.ppl[-1][task.index]}
    return metrics, per_utterance, after


def _record(session: Session, phase: Phase, metrics: RunMetrics, result: PhaseResult, after: dict,
            train_examples: int | None) -> RunMetrics:
    """`metrics` with the phase's record (figures, hook times, costs, passes) and the derived summary."""
    task, reused = phase.task, {"phase1_from": str(phase.reuse)} if phase.reuse else {}
    record = PhaseRecord(
        phase=task.index + 1, task=task.name, steps=result.steps, target_tokens=result.target_tokens,
        wall_s=round(result.wall_s, 2), tokens_per_s=round(result.tokens_per_s, 1), best_val_loss=result.best_val_loss,
        stopped_early=result.stopped_early, loss_guard_backoffs=result.guard_backoffs, train_examples=train_examples,
        before=phase.before, after=after,
        strategy={"hooks_s": phase.hooks_s, **phase.costs, **phase.passes, **reused},
    )
    metrics = metrics.model_copy(update={"phases": [*metrics.phases, record], "peak_rss_mb": peak_rss_mb(),
                                         "adapter_params": adapter_parameters(session.ctx.model)}).with_summary()
    session.accelerator.log(phase_scalars(metrics.tasks, metrics.ppl, metrics.speaker_attribution),
                            step=phase.step_offset + result.steps)
    return metrics


def _save(session: Session, phase: Phase, metrics: RunMetrics, resolved: str, per_utterance: dict) -> RunMetrics:
    """Main process: the report's samples, the phase checkpoint, RUN/test_nll.json and RUN/metrics.json; then
    the phase's step checkpoints are superseded."""
    config, acc, ctx, strategy, k = session.config, session.accelerator, session.ctx, session.strategy, phase.task.index
    run_dir, router = config.run_dir, phase.router
    if acc.is_main_process:
        with session.stages.timed("samples"):
            samples = [Sample(**row) for row in sample_rows(ctx, router, session.tasks, config.eval, k + 1,
                                                            config.seed)]
        metrics = metrics.model_copy(update={"samples": [*metrics.samples, *samples]})
        saving = time.perf_counter()
        log_text = phase.staging_log.read_text(encoding="utf-8") if phase.staging_log.exists() else ""
        save_checkpoint(
            run_dir / f"phase{k + 1}", ctx.model, ctx.tokenizer, meta=phase.meta,
            files={"config.resolved.yaml": resolved, "train_log.jsonl": log_text,
                   "metrics.json": json.dumps(metrics.phases[-1].model_dump(mode="json"), indent=2) + "\n",
                   ROUTER_FILE: json.dumps(router.to_json(), indent=2) + "\n"},
            tensors=strategy.full_state() or None,
        )
        phase.staging_log.unlink(missing_ok=True)
        write_json(run_dir / TEST_NLL, {"phase": k + 1, **per_utterance})
        session.stages.add("save", time.perf_counter() - saving)
        metrics = metrics.model_copy(update={"stages_s": session.stages.to_json()})
        metrics.write(run_dir / "metrics.json")
        rundir.finish_phase(run_dir, k)  # only now are its step checkpoints superseded
    acc.wait_for_everyone()
    return metrics


def _values(row: list[Scores]) -> tuple[list[float], list[float | None]]:
    return [s.ppl for s in row], [None if math.isnan(s.attribution) else s.attribution for s in row]


def _with_row(metrics: RunMetrics, session: Session, router) -> tuple[RunMetrics, dict]:
    """`metrics` with the next matrix row (a router that needs the task id adds the agnostic row too),
    and that row's per-utterance NLLs by routing and task (RUN/test_nll.json: paired comparisons)."""
    start = time.perf_counter()
    # what the oracle row scored, by weights: the agnostic row reuses it, and later rows what frozen weights scored
    memo = session.earlier.memo(router, session.tasks)
    scores = test_row(session.ctx, router, session.tasks, session.config.eval, memo=memo)
    session.served.clear()
    for task, score in zip(session.tasks, scores):
        with router.oracle(task.index):
            session.served[task.index] = (served_fingerprint(session.ctx.model, session.strategy), score.ppl,
                                          router.oracle_name(task.index))
    ppl, attribution = _values(scores)
    update: dict = {"ppl": [*metrics.ppl, ppl], "speaker_attribution": [*metrics.speaker_attribution, attribution]}
    rows = {"oracle" if router.task_routed else "single": scores}
    if router.task_routed:
        rows["agnostic"] = test_row(session.ctx, router, session.tasks, session.config.eval, agnostic=True, memo=memo)
        routed, routed_attribution = _values(rows["agnostic"])
        agnostic = metrics.agnostic or AgnosticRows()
        update["routing"] = "oracle"
        update["agnostic"] = agnostic.model_copy(update={"ppl": [*agnostic.ppl, routed], "speaker_attribution": [
            *agnostic.speaker_attribution, routed_attribution]})
    session.earlier.keep(memo)
    per_utterance = {mode: {task.name: {"lines": [e.line for e in task.test], "nll": s.nll, "targets": s.targets}
                            for task, s in zip(session.tasks, row)} for mode, row in rows.items()}
    attribution = sum(s.attribution_s for row in rows.values() for s in row)
    session.stages.add("attribution", attribution)
    session.stages.add("evaluate", time.perf_counter() - start - attribution)
    return metrics.model_copy(update=update), per_utterance


def _reuse_phase(source: Path, model, staging_log: Path | None) -> PhaseResult:
    """Load a finished phase-1 adapter (a sweep sharing phase-1 settings) instead of training it."""
    verify(source)
    state = load_file(str(source / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, state)
    if staging_log:
        shutil.copyfile(source / "train_log.jsonl", staging_log)
    record = read_json(source / "metrics.json")
    # The training time of the phase it stands for: cost ledgers compare strategies' whole work.
    return PhaseResult(steps=record["steps"], target_tokens=record["target_tokens"], wall_s=record["wall_s"],
                       tokens_per_s=record["tokens_per_s"], best_val_loss=record["best_val_loss"])
