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
from pathlib import Path

from accelerate.utils import set_seed
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from cltune.config import BaseRunConfig, dump_config
from cltune.data import TaskData
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


def run(config: BaseRunConfig, *, reuse_phase1: Path | None = None, console=None, resume: bool = False,
        log_with: Sequence[str] = ()) -> RunMetrics:
    """Run the stream (or, with `resume`, continue it); returns the metrics also written to RUN/metrics.json.
    `log_with`: Accelerate trackers to log to (`cltune.training.tracking`)."""
    set_seed(config.seed)
    with claim(config.run_dir, enabled=main_process()):  # one run per run folder at a time
        session = build_session(config, log_with=log_with)
        try:
            return _run(session, reuse_phase1, console, resume, tracked=bool(log_with))
        finally:
            session.accelerator.end_training()


def _run(session: Session, reuse_phase1: Path | None, console, resume: bool, tracked: bool) -> RunMetrics:
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
        _prepare_run_dir(session, resolved, inputs, fresh=fresh)
    if tracked:  # after a fresh run has cleared an earlier run's logs (trackers live on the main process)
        acc.init_trackers(config.name, config=flat_settings(config.model_dump(mode="json")))

    metrics = _header(session)
    if saved is not None and saved.phases:  # finished phases are not retrained: their rows come from metrics.json
        metrics = metrics.model_copy(update={k: getattr(saved, k)
                                             for k in ("ppl", "speaker_attribution", "phases", "samples",
                                                       "routing", "agnostic")})
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


def run_phase(session: Session, task: TaskData, metrics: RunMetrics, resolved: str, *, reuse_phase1: Path | None = None,
              resume: bool = False) -> RunMetrics:
    """Phase `task.index + 1`: strategy hooks around training, a new matrix row, the phase checkpoint."""
    config, acc, ctx, strategy = session.config, session.accelerator, session.ctx, session.strategy
    k, run_dir = task.index, config.run_dir
    staging_log = run_dir / f".phase{k + 1}.train_log.jsonl"
    if acc.is_main_process:  # the one writer of the log; another process must not unlink it under it
        staging_log.unlink(missing_ok=True)
    set_seed(derived_seed(config.seed, k, "before_task"))  # the same draws whether or not resumed
    step_offset = sum(p.steps for p in metrics.phases)  # trackers count optimizer steps over the whole stream
    passes_at_start = (ctx.scorer.forward_tokens, ctx.scorer.backward_tokens)
    meta = {"model": config.model.model_dump(), "phase": k + 1, "task": task.name,
            "speaker_tokens": session.speaker_tokens,
            "context_turns": config.data.context_turns, "max_length": config.data.max_length,
            "tasks": [{"name": t.name, "speakers": t.speakers} for t in session.tasks]}
    checkpoints = None if reuse_phase1 is not None else resuming.StepCheckpoints(
        resuming.steps_folder(run_dir, k), config.phase(k).checkpoint_every, config.phase(k).save_total_limit, meta,
        resume=resume)
    # Continuing from a step checkpoint: it restores the trained weights, so work whose only product is
    # those weights (Reptile's meta-training) is skipped, and the phase's start figures, set-up passes and
    # costs are the interrupted process's, recorded with the checkpoint.
    setup = checkpoints.latest_setup() if checkpoints else None
    ctx.resumed_phase = setup is not None
    hook_start = time.perf_counter()
    try:
        strategy.before_task(task)
    finally:
        ctx.resumed_phase = False
    settle_dtypes(ctx.model, ctx.base_dtype)  # an adapter it added came in the base's dtype
    hooks_s = {"before_task": round(time.perf_counter() - hook_start, 2)}
    examples = strategy.train_data(task)  # once per phase
    if setup is not None:
        before, hooks_s = setup["before"], setup["hooks_s"]
        strategy.costs[k + 1] = {**strategy.costs.get(k + 1, {}), **setup["costs"]}
        ctx.scorer.forward_tokens, ctx.scorer.backward_tokens = (
            p + q for p, q in zip(passes_at_start, setup["passes"]))
    else:
        # The model the phase starts from (before_task may have changed it: an adapter added, meta-training),
        # served as the matrix serves this task.
        with strategy.router().oracle(k):
            before = {"val_ppl": perplexity(acc, ctx.scorer, ctx.tokenizer, task.val, ctx.max_length,
                                            config.eval.batch_size)}
            fingerprint, measured = session.served.get(k, (None, None))
            # Most strategies start a phase from the model the last matrix row scored: its figure is reused.
            before["test_ppl"] = measured if fingerprint == served_fingerprint(ctx.model, strategy) else perplexity(
                acc, ctx.scorer, ctx.tokenizer, task.test, ctx.max_length, config.eval.batch_size)
    loop_start = (ctx.scorer.forward_tokens, ctx.scorer.backward_tokens)
    if checkpoints is not None:
        checkpoints.setup = {"before": before, "hooks_s": hooks_s, "costs": strategy.costs.get(k + 1, {}),
                             "passes": [now - then for now, then in zip(loop_start, passes_at_start)]}
    if reuse_phase1 is not None:
        result = _reuse_phase(reuse_phase1, ctx.model, staging_log if acc.is_main_process else None)
    else:
        result = train_phase(ctx, strategy, task, examples, config.phase(k), k, staging_log, checkpoints, step_offset)
    loop_end = (ctx.scorer.forward_tokens, ctx.scorer.backward_tokens)
    hook_start = time.perf_counter()
    strategy.after_task(task)
    settle_dtypes(ctx.model, ctx.base_dtype)
    hooks_s["after_task"] = round(time.perf_counter() - hook_start, 2)
    passes = _passes(ctx.scorer, passes_at_start, loop_start, loop_end)
    if reuse_phase1 is not None:  # the training of the phase it stands for counts, as its wall time does
        source = read_json(reuse_phase1 / "metrics.json").get("strategy", {})
        trained = [source.get(f"training_{key}", source.get(key)) for key in ("forward_tokens", "backward_tokens")]
        passes = {"forward_tokens": None, "backward_tokens": None} if None in trained else {
            "forward_tokens": passes["forward_tokens"] + trained[0],
            "backward_tokens": passes["backward_tokens"] + trained[1],
            "training_forward_tokens": trained[0], "training_backward_tokens": trained[1]}
    router = strategy.router()
    metrics, per_utterance = _with_row(metrics, session, router)
    with router.oracle(k):
        # The loop's last validation scored these very weights unless early stopping or after_task changed them.
        validated, val_ppl = result.last_val or (None, None)
        after = {"val_ppl": val_ppl if validated == served_fingerprint(ctx.model, strategy) else perplexity(
            acc, ctx.scorer, ctx.tokenizer, task.val, ctx.max_length, config.eval.batch_size),
            "test_ppl": metrics.ppl[-1][k]}
    record = PhaseRecord(
        phase=k + 1, task=task.name, steps=result.steps, target_tokens=result.target_tokens,
        wall_s=round(result.wall_s, 2), tokens_per_s=round(result.tokens_per_s, 1), best_val_loss=result.best_val_loss,
        stopped_early=result.stopped_early, train_examples=None if reuse_phase1 is not None else len(examples),
        before=before, after=after, strategy={"hooks_s": hooks_s, **strategy.costs.get(k + 1, {}), **passes,
                                              **({"phase1_from": str(reuse_phase1)} if reuse_phase1 else {})},
    )
    metrics = metrics.model_copy(update={"phases": [*metrics.phases, record], "peak_rss_mb": peak_rss_mb(),
                                         "adapter_params": adapter_parameters(ctx.model)}).with_summary()
    acc.log(phase_scalars(metrics.tasks, metrics.ppl, metrics.speaker_attribution), step=step_offset + result.steps)
    if acc.is_main_process:
        samples = [Sample(**row) for row in sample_rows(ctx, router, session.tasks, config.eval, k + 1, config.seed)]
        metrics = metrics.model_copy(update={"samples": [*metrics.samples, *samples]})
        log_text = staging_log.read_text(encoding="utf-8") if staging_log.exists() else ""
        save_checkpoint(
            run_dir / f"phase{k + 1}", ctx.model, ctx.tokenizer, meta=meta,
            files={"config.resolved.yaml": resolved, "train_log.jsonl": log_text,
                   "metrics.json": json.dumps(record.model_dump(mode="json"), indent=2) + "\n",
                   ROUTER_FILE: json.dumps(router.to_json(), indent=2) + "\n"},
            tensors=strategy.full_state() or None,
        )
        staging_log.unlink(missing_ok=True)
        write_json(run_dir / TEST_NLL, {"phase": k + 1, **per_utterance})
        metrics.write(run_dir / "metrics.json")
        rundir.finish_phase(run_dir, k)  # only now are its step checkpoints superseded
    acc.wait_for_everyone()
    return metrics


def _values(row: list[Scores]) -> tuple[list[float], list[float | None]]:
    return [s.ppl for s in row], [None if math.isnan(s.attribution) else s.attribution for s in row]


def _with_row(metrics: RunMetrics, session: Session, router) -> tuple[RunMetrics, dict]:
    """`metrics` with the next matrix row (a router that needs the task id adds the agnostic row too),
    and that row's per-utterance NLLs by routing and task (RUN/test_nll.json: paired comparisons)."""
    scores = test_row(session.ctx, router, session.tasks, session.config.eval)
    session.served.clear()
    for task, score in zip(session.tasks, scores):
        with router.oracle(task.index):
            session.served[task.index] = (served_fingerprint(session.ctx.model, session.strategy), score.ppl)
    ppl, attribution = _values(scores)
    update: dict = {"ppl": [*metrics.ppl, ppl], "speaker_attribution": [*metrics.speaker_attribution, attribution]}
    rows = {"oracle" if router.task_routed else "single": scores}
    if router.task_routed:
        rows["agnostic"] = test_row(session.ctx, router, session.tasks, session.config.eval, agnostic=True)
        routed, routed_attribution = _values(rows["agnostic"])
        agnostic = metrics.agnostic or AgnosticRows()
        update["routing"] = "oracle"
        update["agnostic"] = agnostic.model_copy(update={"ppl": [*agnostic.ppl, routed], "speaker_attribution": [
            *agnostic.speaker_attribution, routed_attribution]})
    per_utterance = {mode: {task.name: {"lines": [e.line for e in task.test], "nll": s.nll, "targets": s.targets}
                            for task, s in zip(session.tasks, row)} for mode, row in rows.items()}
    return metrics.model_copy(update=update), per_utterance


def _passes(scorer, start, loop_start, loop_end) -> dict[str, int]:
    """The phase's model passes outside evaluation (token positions), and the training loop's share."""
    return {"forward_tokens": scorer.forward_tokens - start[0], "backward_tokens": scorer.backward_tokens - start[1],
            "training_forward_tokens": loop_end[0] - loop_start[0],
            "training_backward_tokens": loop_end[1] - loop_start[1]}


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
