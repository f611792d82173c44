"""The training loop: one phase of LoRA fine-tuning on Accelerate, with strategy hooks.

Runs unchanged on CPU, one GPU, or several processes under `accelerate launch`.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import get_scheduler

from cltune.batching import collate, length_grouped_batches
from cltune.config import PhaseSettings
from cltune.data.split import TaskData, require_no_test
from cltune.evaluate import mean_loss
from cltune.scoring import target_nll
from cltune.strategies.base import Context, Strategy


class DivergedError(RuntimeError):
    """Loss or gradients became NaN/inf: the phase stops and its last good weights are kept."""


@dataclass
class PhaseResult:
    steps: int = 0
    target_tokens: int = 0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    val_losses: list[float] = field(default_factory=list)
    best_val_loss: float | None = None
    stopped_early: bool = False


def plan_steps(lengths: list[int], settings: PhaseSettings, seed: int) -> list[tuple[int, list[list[int]]]]:
    """(epoch, micro-batches) per optimizer step, for all epochs, capped by max_steps.

    Fractional epochs take the first part of the last epoch's seeded order.
    """
    per_step = math.ceil(settings.batch_size / settings.micro_batch_size)
    steps: list[tuple[int, list[list[int]]]] = []
    for epoch in range(math.ceil(settings.epochs)):
        micro = length_grouped_batches(lengths, settings.micro_batch_size, seed=seed * 1_000 + epoch)
        share = min(1.0, settings.epochs - epoch)
        micro = micro[: max(1, round(share * len(micro)))]
        steps += [(epoch, micro[i : i + per_step]) for i in range(0, len(micro), per_step)]
    return steps[: settings.max_steps] if settings.max_steps else steps


def _trainable_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(model, snapshot: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} · {task.fields[tps]:.0f} tok/s"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def train_phase(
    ctx: Context, strategy: Strategy, task: TaskData, settings: PhaseSettings, phase: int, log_path: Path | None
) -> PhaseResult:
    """Train on `strategy.train_data(task)`; returns throughput and validation figures."""
    acc = ctx.accelerator
    examples = require_no_test(strategy.train_data(task), "training")
    encoded = ctx.encode(examples)
    pad_id = ctx.tokenizer.pad_token_id
    plan = plan_steps([len(s) for s in encoded], settings, ctx.seed + phase)
    plan = plan[acc.process_index :: acc.num_processes][: len(plan) // acc.num_processes or 1]
    pack = settings.pack_length if settings.packing else None

    params = [p for p in ctx.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = get_scheduler(
        settings.schedule, optimizer, num_warmup_steps=round(settings.warmup_ratio * len(plan)), num_training_steps=len(plan)
    )
    scorer, optimizer = acc.prepare(ctx.scorer, optimizer)
    val_every = settings.eval_every or max(1, math.ceil(len(plan) / math.ceil(settings.epochs)))

    result = PhaseResult()
    best_state, since_best = _trainable_snapshot(ctx.model), 0
    log = log_path.open("a", encoding="utf-8") if (log_path and acc.is_main_process) else None
    start = time.perf_counter()
    scorer.train()
    with _progress(acc.is_main_process) as progress:
        bar = progress.add_task(f"phase {phase + 1} · {task.name}", total=len(plan), loss=float("nan"), tps=0.0)
        for step, (epoch, micro_batches) in enumerate(plan, start=1):
            batches = [collate(encoded, mb, pad_id, pack) for mb in micro_batches]
            step_targets = sum(b.n_targets for b in batches)
            step_loss = 0.0
            for i, batch in enumerate(batches):
                # Token-weighted accumulation: every target token of the step weighs the same, so
                # micro_batch_size changes speed only, never the math. DDP syncs on the last one.
                sync = i == len(batches) - 1
                inputs = {k: v.to(acc.device) for k, v in batch.model_inputs().items()}
                with nullcontext() if sync else acc.no_sync(scorer), acc.autocast():
                    logits = scorer(**inputs)
                    nll = target_nll(logits, inputs["labels"]).sum()
                    loss = nll / step_targets
                    extra = strategy.extra_loss(batch, logits)
                    if extra is not None:
                        loss = loss + extra * (batch.n_targets / step_targets)
                    if not torch.isfinite(loss):
                        _restore(ctx.model, best_state)
                        raise DivergedError(
                            f"phase {phase + 1}, step {step}: loss is {loss.item()}; lower the learning rate "
                            "(the last good weights were kept)"
                        )
                    acc.backward(loss)
                step_loss += nll.item() / step_targets
            strategy.after_backward()
            grad_norm = acc.clip_grad_norm_(params, settings.max_grad_norm)
            if not torch.isfinite(torch.as_tensor(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                _restore(ctx.model, best_state)
                raise DivergedError(f"phase {phase + 1}, step {step}: gradient norm is {grad_norm}; lower the learning rate")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            strategy.after_step()

            result.steps = step
            result.target_tokens += step_targets
            elapsed = time.perf_counter() - start
            tps = result.target_tokens * acc.num_processes / elapsed
            progress.update(bar, advance=1, loss=step_loss, tps=tps)
            if log:
                row = {"phase": phase + 1, "task": task.name, "epoch": epoch + 1, "step": step, "loss": round(step_loss, 5),
                       "lr": scheduler.get_last_lr()[0], "target_tokens": result.target_tokens, "tokens_per_s": round(tps, 1),
                       "elapsed_s": round(elapsed, 2)}
                log.write(json.dumps(row) + "\n")

            if step % val_every == 0 or step == len(plan):
                val = mean_loss(acc, ctx.scorer, ctx.tokenizer, require_no_test(task.val, "validation"), ctx.max_length)
                scorer.train()
                result.val_losses.append(val)
                if log:
                    log.write(json.dumps({"phase": phase + 1, "task": task.name, "step": step, "val_loss": round(val, 5)}) + "\n")
                if result.best_val_loss is None or val < result.best_val_loss:
                    result.best_val_loss, best_state, since_best = val, _trainable_snapshot(ctx.model), 0
                else:
                    since_best += 1
                    if settings.early_stopping_patience and since_best >= settings.early_stopping_patience:
                        result.stopped_early = True
                        break
    if log:
        log.close()
    if settings.early_stopping_patience:
        _restore(ctx.model, best_state)  # keep the best validated weights, as early stopping promises
    acc.unwrap_model(scorer, keep_fp32_wrapper=False)  # evaluation after training runs in fp32
    acc.free_memory()
    scorer.eval()
    result.wall_s = time.perf_counter() - start
    result.tokens_per_s = result.target_tokens * acc.num_processes / max(result.wall_s, 1e-9)
    return result
