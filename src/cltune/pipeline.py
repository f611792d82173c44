"""A whole continual-learning stream from one config: data → model → phases → metrics.json.

Each phase writes RUN/phaseK/ (adapter, tokenizer, resolved config, train log, phase metrics);
RUN/metrics.json holds the perplexity matrix and every derived metric, rewritten after each phase.
During a phase RUN/steps/phaseK/ holds its latest step checkpoints. `resume=True` skips the
phases that metrics.json records, restores the last one's checkpoint and strategy state, and
continues the next phase from its latest step checkpoint; the result equals an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from cltune import metrics as cl_metrics
from cltune import resume as resuming
from cltune.checkpoint import save_checkpoint, verify
from cltune.config import BaseRunConfig, dump_config
from cltune.data import TaskData, assign_speaker_tokens, build_task, load_dialogue
from cltune.data.eda import summarize, write_eda
from cltune.errors import UserError
from cltune.evaluate import perplexity, perplexity_and_attribution
from cltune.files import read_json, write_json
from cltune.generate import SAMPLE_TEMPERATURE, SAMPLE_TOP_P, sample_continuations
from cltune.model import add_special_tokens, attach_lora, load_base, parameter_counts, resize_for
from cltune.scoring import TokenScorer
from cltune.strategies import Context, create_strategy
from cltune.train import PhaseResult, train_phase

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A task name usable as a file name: no separators, no leading dots (no path traversal)."""
    cleaned = _UNSAFE.sub("_", name).strip("._") or "task"
    return cleaned[:64]


def load_tasks(config: BaseRunConfig) -> tuple[list, list[TaskData], dict[str, str]]:
    data = config.data
    datasets = []
    for spec in config.tasks:
        datasets.append(load_dialogue(
            spec.path, speaker_col=spec.speaker_col or data.speaker_col, text_col=spec.text_col or data.text_col,
            aliases=data.aliases, drop_missing=data.drop_missing, name=safe_name(spec.name or Path(spec.path).stem),
        ))
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise UserError(f"tasks: names {names} repeat; give each task a distinct `name`")
    tokens = assign_speaker_tokens([s for d in datasets for s in d.speakers], data.speaker_tokens)
    tasks = [build_task(d, i, tokens, data.split, config.seed) for i, d in enumerate(datasets)]
    return datasets, tasks, tokens


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the `/proc/cpuinfo` text given) has native bf16 matmul units: AVX-512 BF16 or
    AMX. Elsewhere bf16 is emulated and slow."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def mixed_precision(precision: str) -> str:
    """Accelerate's mixed-precision mode for a `model.precision` setting: 'no', 'bf16' or 'fp16'."""
    if precision == "fp32":
        return "no"
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "no"


def make_accelerator(precision: str) -> Accelerator:
    """A fresh Accelerator for one run at `precision` (a `model.precision` setting or an Accelerate mode).

    Accelerate keeps its settings in process-wide state and refuses a second Accelerator with
    another precision. A run owns its precision, so several runs in one process (a notebook, a
    sweep, the tests) must not inherit the previous one's: the accelerator settings are cleared
    first. The process-level state (device, process group under `accelerate launch`) is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    # Launched as several processes (torchrun, `accelerate launch --multi_gpu`) on a machine without
    # CUDA: Accelerate only forms the gloo process group when told to use the CPU; otherwise each
    # process would run the whole stream alone and all would write the same files.
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=mixed_precision(precision), cpu=several and not torch.cuda.is_available())


def build_model(config: BaseRunConfig, speaker_tokens: list[str], accelerator: Accelerator):
    """Base model + [PAD]/speaker tokens + LoRA, wrapped in the scorer; returns (ctx parts, counts)."""
    model, tokenizer = load_base(config.model)
    new_ids = add_special_tokens(tokenizer, speaker_tokens)
    resize_for(model, tokenizer)
    model = attach_lora(model, config.lora, new_ids)
    scorer = TokenScorer(model).to(accelerator.device)
    return model, tokenizer, scorer, new_ids, parameter_counts(model)


def _row(ctx: Context, strategy, tasks: list[TaskData], config: BaseRunConfig) -> tuple[list[float], list[float]]:
    ppl, attribution = [], []
    for task in tasks:
        candidates = list(task.tokens.values()) if config.eval.attribution else []
        with strategy.evaluating(task.index):
            scores = perplexity_and_attribution(ctx.accelerator, ctx.scorer, ctx.tokenizer, task.test, candidates,
                                                ctx.max_length, config.eval.batch_size)
        ppl.append(scores[0])
        attribution.append(scores[1])
    return ppl, attribution


def _samples(ctx: Context, strategy, tasks: list[TaskData], config: BaseRunConfig, phase: int) -> list[dict]:
    """`samples_per_speaker` generations per speaker of each task, one batch per task (seeded)."""
    out = []
    for task in tasks:
        rows = [(speaker, token) for speaker, token in task.tokens.items() for _ in range(config.eval.samples_per_speaker)]
        if not rows:
            continue
        prompts = [[ctx.tokenizer.convert_tokens_to_ids(token)] for _, token in rows]
        with strategy.evaluating(task.index):
            texts = sample_continuations(ctx.model, ctx.tokenizer, prompts, max_new_tokens=config.eval.max_new_tokens,
                                         temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, seed=config.seed,
                                         batch_size=len(prompts))
        out += [{"phase": phase, "task": task.name, "speaker": speaker, "token": token, "text": text}
                for (speaker, token), text in zip(rows, texts)]
    return out


def _nan_to_none(values):
    return [None if isinstance(v, float) and v != v else v for v in values]


def _prepare_run_dir(config: BaseRunConfig, resolved: str, datasets, tokenizer, inputs: list[dict], fresh: bool) -> None:
    """Main process: the resolved config and EDA; a fresh run also forgets an earlier run's progress."""
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        resuming.start_fresh(run_dir, inputs)
    (run_dir / "config.resolved.yaml").write_text(resolved, encoding="utf-8")
    summaries = [summarize(d, lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"]), config.data.max_length)
                 for d in datasets]
    write_eda(summaries, run_dir / "eda", f"{config.model.name} tokenizer", config.data.max_length)


def _phase_record(k: int, task: TaskData, result: PhaseResult, train_examples, before: dict, after: dict) -> dict:
    return {
        "phase": k + 1, "task": task.name, "steps": result.steps, "target_tokens": result.target_tokens,
        "wall_s": round(result.wall_s, 2), "tokens_per_s": round(result.tokens_per_s, 1),
        "best_val_loss": result.best_val_loss, "stopped_early": result.stopped_early,
        "train_examples": train_examples, "before": before, "after": after,
    }


def run(config: BaseRunConfig, *, reuse_phase1: Path | None = None, console=None, resume: bool = False) -> dict:
    """Run the stream (or, with `resume`, continue it); returns the metrics dict also written to RUN/metrics.json."""
    set_seed(config.seed)
    precision = mixed_precision(config.model.precision)  # chosen once per run, recorded in metrics.json
    acc = make_accelerator(precision)
    run_dir = config.run_dir
    datasets, tasks, tokens = load_tasks(config)
    resolved, inputs = dump_config(config), resuming.input_hashes(config)
    saved = resuming.saved_progress(run_dir, resolved, inputs) if resume else {}
    model, tokenizer, scorer, new_ids, counts = build_model(config, sorted(set(tokens.values())), acc)
    ctx = Context(acc, model, scorer, tokenizer, tasks, config.data.max_length, config.seed, run_dir, new_ids, config.lora)
    strategy = create_strategy(config.strategy, ctx, config)
    if acc.is_main_process:
        _prepare_run_dir(config, resolved, datasets, tokenizer, inputs, fresh=not resume)

    metrics: dict = {
        "run": config.name, "strategy": config.strategy, "model": config.model.name,
        "precision": "fp32" if precision == "no" else precision, "processes": acc.num_processes,
        "tasks": [t.name for t in tasks], "speaker_tokens": tokens, "parameters": counts,
        "split_sizes": [{"train": len(t.train), "val": len(t.val), "test": len(t.test)} for t in tasks],
    }
    phases = saved.get("phases", [])
    if phases:  # finished phases are not retrained: their rows come from metrics.json
        ppl_rows, attribution_rows, samples = saved["ppl"], saved["speaker_attribution"], saved["samples"]
        resuming.restore_phase(ctx, strategy, run_dir / f"phase{len(phases)}")
    else:
        row, attribution = _row(ctx, strategy, tasks, config)
        ppl_rows, attribution_rows, samples = [row], [_nan_to_none(attribution)], []
    if console and acc.is_main_process:
        console.print(f"[bold]{config.name}[/]: {len(tasks)} tasks, strategy {config.strategy}, "
                      f"LoRA {counts['lora']:,} + token rows {counts['new_token_rows']:,} trainable of {counts['total']:,}"
                      + (f"; resuming after phase {len(phases)}" if resume and phases else ""))
    first = len(phases)
    for task in tasks[first:]:
        k = task.index
        phase_dir = run_dir / f"phase{k + 1}"
        staging_log = run_dir / f".phase{k + 1}.train_log.jsonl"
        if acc.is_main_process:  # the one writer of the log; another process must not unlink it under it
            staging_log.unlink(missing_ok=True)
        set_seed(resuming.derived_seed(config.seed, k, "before_task"))  # the same draws whether or not resumed
        hook_start = time.perf_counter()
        strategy.before_task(task)
        hooks_s = {"before_task": round(time.perf_counter() - hook_start, 2)}
        before = {"val_ppl": perplexity(acc, scorer, tokenizer, task.val, ctx.max_length), "test_ppl": ppl_rows[-1][k]}
        meta = {"model": config.model.model_dump(), "phase": k + 1, "task": task.name, "speaker_tokens": tokens}
        if k == 0 and reuse_phase1 is not None:
            result = _reuse_phase(reuse_phase1, model, staging_log if acc.is_main_process else None)
        else:
            settings = config.phase(k)
            checkpoints = resuming.StepCheckpoints(resuming.steps_folder(run_dir, k), settings.checkpoint_every,
                                                   settings.save_total_limit, meta, resume=resume and k == first)
            result = train_phase(ctx, strategy, task, settings, k, staging_log, checkpoints)
        hook_start = time.perf_counter()
        strategy.after_task(task)
        hooks_s["after_task"] = round(time.perf_counter() - hook_start, 2)
        row, attribution = _row(ctx, strategy, tasks, config)
        ppl_rows.append(row)
        attribution_rows.append(_nan_to_none(attribution))
        after = {"val_ppl": perplexity(acc, scorer, tokenizer, task.val, ctx.max_length), "test_ppl": row[k]}
        train_examples = len(strategy.train_data(task)) if k or reuse_phase1 is None else None
        phase_record = _phase_record(k, task, result, train_examples, before, after)
        phase_record["strategy"] = {"hooks_s": hooks_s, **strategy.costs.get(k + 1, {})}
        phases.append(phase_record)
        if acc.is_main_process:
            samples += _samples(ctx, strategy, tasks, config, k + 1)
            log_text = staging_log.read_text(encoding="utf-8") if staging_log.exists() else ""
            save_checkpoint(
                phase_dir, model, tokenizer, meta=meta,
                files={"config.resolved.yaml": resolved, "train_log.jsonl": log_text,
                       "metrics.json": _json_text(phase_record)},
                tensors=strategy.state() or None,
            )
            staging_log.unlink(missing_ok=True)
            write_json(run_dir / "metrics.json", _with_results(metrics, ppl_rows, attribution_rows, phases, samples))
            resuming.finish_phase(run_dir, k)  # only now are its step checkpoints superseded
        acc.wait_for_everyone()
    return _with_results(metrics, ppl_rows, attribution_rows, phases, samples)


def _with_results(metrics: dict, ppl_rows, attribution_rows, phases, samples) -> dict:
    metrics.update({"ppl": ppl_rows, "speaker_attribution": attribution_rows, "phases": phases, "samples": samples})
    if len(ppl_rows) == len(metrics["tasks"]) + 1:
        metrics.update(cl_metrics.summary(ppl_rows))
    return metrics


def _json_text(obj) -> str:
    import json

    return json.dumps(obj, indent=2, default=str) + "\n"


def _reuse_phase(source: Path, model, staging_log: Path | None) -> PhaseResult:
    """Load a finished phase-1 adapter (a sweep sharing phase-1 settings) instead of training it."""
    verify(source)
    state = load_file(str(source / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, state)
    if staging_log:
        shutil.copyfile(source / "train_log.jsonl", staging_log)
    record = read_json(source / "metrics.json")
    return PhaseResult(steps=record["steps"], target_tokens=record["target_tokens"], wall_s=0.0,
                       tokens_per_s=record["tokens_per_s"], best_val_loss=record["best_val_loss"])
