"""The training loop: one phase of LoRA fine-tuning on Accelerate, with strategy hooks.

Runs unchanged on CPU, one GPU, or several processes under `accelerate launch`: every process
walks the same step plan and takes its share of each step's micro-batches, so an optimizer step
sees the same data (and, up to summation order, the same gradient) on 1 or N processes. Saves
step checkpoints as it goes and can continue from one exactly (see `cltune.training.resume`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from transformers import get_scheduler

from cltune.config import PhaseSettings
from cltune.data.split import Example, TaskData, require_no_test
from cltune.errors import DivergedError, UserError
from cltune.evaluation.evaluate import perplexity
from cltune.modeling.batching import Batch, collate, length_grouped_batches, target_count, window_groups
from cltune.modeling.memory import release_free_memory
from cltune.modeling.model import is_adapter_weight
from cltune.modeling.scoring import target_nll
from cltune.modeling.speaker_loss import SpeakerContrast
from cltune.storage.hashing import derived_seed, fingerprint
from cltune.strategies.base import Context, Outputs, StepInfo, Strategy, weights_digest
from cltune.training import interrupt
from cltune.training.resume import StepCheckpoints

logger = logging.getLogger(__name__)


@dataclass
class PhaseResult:
    steps: int = 0
    target_tokens: int = 0
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    val_losses: list[float] = field(default_factory=list)
    best_val_loss: float | None = None
    stopped_early: bool = False
    guard_backoffs: int = 0  # times the loss guard took the weights back and halved the learning rates
    # (served_fingerprint, validation PPL) of the latest validation: the pipeline reuses the figure when the
    # phase ends on those weights
    last_val: tuple[str, float] | None = None
    # seconds of wall_s spent validating and writing step checkpoints (the pipeline's evaluate and save stages)
    validation_s: float = 0.0
    checkpoint_s: float = 0.0


def split_wide(micro_batch: list[int], lengths: list[int], max_tokens: int | None) -> list[list[int]]:
    """`micro_batch` halved until each part's padded size (rows × longest) fits `max_tokens`.

    A single utterance is never split. The loop weighs every target token of a step equally, so the
    parts give the step the same gradient as the whole; they only lower the peak memory of one
    forward pass. With packing the budget still counts unpacked positions.
    """
    width = max(lengths[i] for i in micro_batch)
    if max_tokens is None or len(micro_batch) == 1 or len(micro_batch) * width <= max_tokens:
        return [micro_batch]
    half = (len(micro_batch) + 1) // 2
    return split_wide(micro_batch[:half], lengths, max_tokens) + split_wide(micro_batch[half:], lengths, max_tokens)


CPU_MICRO_BATCH_TOKENS = 400  # what `max_micro_batch_tokens: auto` means on a CPU: ~1.5 GB of activations at 135M


LENGTH_GROUP = 8  # utterances of similar length drawn together when steps are formed
WIDE_MICRO_BATCH = 32  # what `micro_batch_size: auto` means where bf16 matmul units are wide (AMX, GPUs)
NARROW_MICRO_BATCH = 8  # ... and elsewhere (measured: docs/benchmarks/performance.md)


def token_budget(settings: PhaseSettings, device: torch.device) -> int | None:
    """The phase's `max_micro_batch_tokens` with `auto` resolved for `device`."""
    if settings.max_micro_batch_tokens == "auto":
        return CPU_MICRO_BATCH_TOKENS if device.type == "cpu" else None
    return settings.max_micro_batch_tokens


def micro_batch(settings: PhaseSettings, wide: bool) -> int:
    """The phase's `micro_batch_size` with `auto` resolved: `wide` where the matmul units are (bf16 on a
    CPU with AMX/AVX-512 BF16, any GPU)."""
    if settings.micro_batch_size == "auto":
        return WIDE_MICRO_BATCH if wide else NARROW_MICRO_BATCH
    return settings.micro_batch_size


def plan_steps(lengths: list[int], settings: PhaseSettings, seed: int, max_tokens: int | None = None,
               micro_batch_size: int | None = None,
               windows: list[str | None] | None = None) -> list[tuple[int, list[list[int]]]]:
    """(epoch, micro-batches) per optimizer step, for all epochs, capped by max_steps.

    Which utterances share a step depends on the seed, the lengths and `batch_size` only: groups of
    similar-length utterances in a seeded order (the largest divisor of batch_size up to
    LENGTH_GROUP), batch_size of them per step. Each step is then sorted by length and cut into micro-batches
    (`micro_batch_size`,
    default the settings' number), and micro-batches wider than `max_tokens` are halved; the loop
    weighs every target token of a step alike, so neither changes the step's math. Fractional
    epochs take the first part of the last epoch's seeded order. With `windows` (each utterance's
    conversation window, `context_turns: all`) the plan is `_window_steps`.
    """
    size = micro_batch_size or micro_batch(settings, wide=False)
    if windows is not None and any(w is not None for w in windows):
        return _window_steps(lengths, windows, settings, seed, max_tokens, size)
    group = max(d for d in range(1, LENGTH_GROUP + 1) if settings.batch_size % d == 0)
    per_step = math.ceil(settings.batch_size / group)
    steps: list[tuple[int, list[list[int]]]] = []
    for epoch in range(math.ceil(settings.epochs)):
        groups = length_grouped_batches(lengths, group, seed=seed * 1_000 + epoch)
        share = min(1.0, settings.epochs - epoch)
        groups = groups[: max(1, round(share * len(groups)))]
        for i in range(0, len(groups), per_step):
            step = sorted((u for g in groups[i : i + per_step] for u in g), key=lambda u: (lengths[u], u))
            steps.append((epoch, [part for k in range(0, len(step), size)
                                  for part in split_wide(step[k : k + size], lengths, max_tokens)]))
    return steps[: settings.max_steps] if settings.max_steps else steps


def _window_steps(lengths: list[int], windows: list[str | None], settings: PhaseSettings, seed: int,
                  max_tokens: int | None, size: int) -> list[tuple[int, list[list[int]]]]:
    """Steps of whole windows (a window's targets are computed in one row, so they train together): windows in
    a seeded order, as many per step as reach `batch_size` utterances; in a step, windows sorted by length and
    grouped into micro-batches of at most `size` rows and `max_tokens` padded positions."""
    groups = window_groups(windows)
    width = [max(lengths[i] for i in g) for g in groups]
    steps: list[tuple[int, list[list[int]]]] = []
    for epoch in range(math.ceil(settings.epochs)):
        order = list(range(len(groups)))
        random.Random(seed * 1_000 + epoch).shuffle(order)
        order = order[: max(1, round(min(1.0, settings.epochs - epoch) * len(order)))]
        step: list[int] = []
        utterances = 0
        for k, g in enumerate(order):
            step.append(g)
            utterances += len(groups[g])
            if utterances >= settings.batch_size or k == len(order) - 1:
                micro: list[list[int]] = []
                for u in sorted(step, key=lambda u: (width[u], u)):
                    rows = len(micro[-1]) if micro else 0
                    if not micro or rows >= size or (max_tokens and (rows + 1) * width[u] > max_tokens):
                        micro.append([])
                    micro[-1].append(u)
                steps.append((epoch, [[i for u in mb for i in groups[u]] for mb in micro]))
                step, utterances = [], 0
    return steps[: settings.max_steps] if settings.max_steps else steps


def param_groups(model, settings: PhaseSettings, strategy: Strategy | None = None) -> list[dict]:
    """The optimizer's parameter groups: the new token rows apart when `token_lr` sets their own rate.

    The strategy's own modules (e.g. a fusion gate) train at `lr` with the LoRA weights.
    """
    trainable = list(_trained(model, strategy).items())
    rows = [p for n, p in trainable if "trainable_tokens_delta" in n]
    if settings.token_lr is None or not rows:
        return [{"params": [p for _, p in trainable]}]
    rest = [p for n, p in trainable if "trainable_tokens_delta" not in n]
    return [g for g in ({"params": rest}, {"params": rows, "lr": settings.token_lr}) if g["params"]]


def _trained(model, strategy: Strategy | None = None) -> dict[str, torch.nn.Parameter]:
    """What the phase trains: the model's trainable parameters and the strategy's own modules' (`module.NAME.`)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, module in (strategy.modules() if strategy else {}).items():
        params.update({f"module.{name}.{n}": p for n, p in module.named_parameters() if p.requires_grad})
    return params


def _trainable_snapshot(model, strategy: Strategy | None = None) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in _trained(model, strategy).items()}


def _restore(model, snapshot: dict[str, torch.Tensor], strategy: Strategy | None = None) -> None:
    params = _trained(model, strategy)
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)


PLAIN_PROGRESS_S = 30.0  # seconds between progress lines when the output is not a terminal


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


@dataclass
class LossGuard:
    """Watches a phase's training loss for a rise that the NaN checks miss (a learning rate too high for some
    weights walks the loss up while every number stays finite).

    The loss is smoothed (exponential average, `decay`), each step counting as many steps as its target tokens
    are of the phase's mean step so far: a step of a twentieth of the mean (a phase's short last step) moves the
    average about a twentieth as much, so one loss measured on few tokens cannot trip it. After `warmup` steps, a
    smoothed loss more than `margin` nats above the lowest smoothed loss so far (perplexity × e ≈ 2.7) means the
    phase is diverging.
    The loop then backs off: the last good weights come back and every learning rate is halved, up to
    `backoffs` times; the next rise stops the phase with a message that names the step and the settings
    to lower. The state travels in step checkpoints, so a resumed phase decides as an
    uninterrupted one would.
    """

    margin: float = 1.0
    # 0.9 averaged away a three-step spike of 3.8 nats (5.7 → 9.5, 8.1, 8.0; the tiny test model at lr 1) that left
    # the weights worse than untrained; at 0.8 it trips at the spike's second step, and ±0.4 nats of batch noise
    # still moves the average by a tenth of the margin.
    decay: float = 0.8
    warmup: int = 5
    backoffs: int = 2
    smoothed: float | None = None
    lowest: float = math.inf
    seen: int = 0
    backed_off: int = 0
    tripped: tuple[float, float] | None = None  # (smoothed, lowest) when it last said back off or stop
    steps: int = 0  # every step observed and their target tokens (the mean step), back-offs included
    tokens: float = 0.0

    def observe(self, loss: float, tokens: float = 1.0) -> str | None:
        """"backoff" or "stop" when this step's loss (mean NLL over its `tokens` target tokens) says the phase
        diverges, else None."""
        self.seen += 1
        self.steps += 1
        self.tokens += tokens
        weight = tokens * self.steps / self.tokens  # this step's share of a mean step: 1 when every step is alike
        keep = self.decay**weight
        self.smoothed = loss if self.smoothed is None else keep * self.smoothed + (1 - keep) * loss
        if self.seen < self.warmup or self.smoothed <= self.lowest + self.margin:
            self.lowest = min(self.lowest, self.smoothed)
            return None
        self.tripped = (self.smoothed, self.lowest)
        if self.backed_off >= self.backoffs:
            return "stop"
        self.backed_off += 1
        self.smoothed, self.seen = None, 0  # the restored weights start a new watch (their loss is the old low)
        return "backoff"


@dataclass
class _Loop:
    """Everything the loop carries from step to step; what a step checkpoint saves and restores."""

    result: PhaseResult
    best_state: dict[str, torch.Tensor]
    since_best: int = 0
    step: int = 0  # optimizer steps done
    elapsed_s: float = 0.0  # training time before this process started (a resumed run adds its own)
    guard: LossGuard = field(default_factory=LossGuard)

    def to_json(self, plan_sha: str, data_sha: str, epoch: int) -> dict:
        return {"step": self.step, "epoch": epoch, "since_best": self.since_best, "elapsed_s": self.elapsed_s,
                "plan_sha256": plan_sha, "data_sha256": data_sha, "result": asdict(self.result),
                "guard": asdict(self.guard),
                "rng": "reseeded every step from (seed, phase, step, process): cltune.storage.hashing.derived_seed"}


def my_share(micro_batches: list[list[int]], rank: int, world: int) -> list[tuple[list[int], float]]:
    """This process's micro-batches of one step, each with its loss weight.

    A process left without one (fewer micro-batches than processes) runs the first at weight 0,
    so that DDP's gradient all-reduce still finds every process.
    """
    mine = micro_batches[rank::world]
    return [(mb, 1.0) for mb in mine] or [(micro_batches[0], 0.0)]


def _sum_over_processes(acc, values: list[float]) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=acc.device)
    return (acc.reduce(totals, "sum") if acc.num_processes > 1 else totals).tolist()


@dataclass
class PhaseParts:
    """What every optimizer step of a phase uses: the run's context and strategy, the prepared (DDP-wrapped)
    scorer, optimizer and scheduler, the trained parameters in clipping order, the phase's settings, and the
    speaker contrast when `speaker_loss` > 0."""

    ctx: Context
    strategy: Strategy
    scorer: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    params: list[torch.nn.Parameter]
    settings: PhaseSettings
    contrast: SpeakerContrast | None = None


@dataclass
class StepWork:
    """One optimizer step: this process's micro-batches with their weights, the step's target tokens and
    utterances over all processes, where it is (StepInfo, and `where` for messages), and the phase's parts."""

    phase: PhaseParts
    batches: list[tuple[Batch, float]]
    targets: int
    examples: int
    info: StepInfo
    where: str


def _optimizer_step(work: StepWork) -> float:
    """One optimizer step over this process's share; returns the step's mean target NLL over all processes.

    Token-weighted: every target token of the step weighs the same, so micro_batch_size and the
    number of processes change speed only, never the math. DDP averages gradients over
    processes, so each loss is scaled by their number to make that average a sum. The strategy's
    step penalty enters once, with the last micro-batch (the one DDP synchronizes), unscaled: its
    average over processes is itself. With `contrast` (`speaker_loss` > 0), the speaker-discrimination
    loss of each utterance is added, weighted by `speaker_loss` / the step's utterances (`step_examples`).
    """
    parts = work.phase
    ctx, strategy, scorer, settings, contrast = parts.ctx, parts.strategy, parts.scorer, parts.settings, parts.contrast
    batches, step_targets, info, where = work.batches, work.targets, work.info, work.where
    acc = ctx.accelerator
    hidden = strategy.wants_hidden_states
    nll_sum = nonfinite = 0.0
    for i, (batch, weight) in enumerate(batches):
        last = i == len(batches) - 1
        inputs = {k: v.to(acc.device) for k, v in batch.model_inputs().items()}
        with nullcontext() if last else acc.no_sync(scorer):  # DDP syncs on the last one
            with acc.autocast():
                outputs = Outputs(*scorer(**inputs, return_hidden=True)) if hidden else Outputs(scorer(**inputs))
                token_nll = target_nll(outputs.logits, inputs["labels"])
                nll = token_nll.sum()
                loss = nll / step_targets
                if contrast is not None:  # the other speakers' passes go through the unwrapped scorer: one DDP forward
                    loss = loss + (contrast.batch_sum(ctx.scorer, batch, token_nll)
                                   * (settings.speaker_loss / work.examples))
                extra = strategy.batch_loss(batch, outputs, info)
                if extra is not None:
                    loss = loss + extra * (batch.n_targets / step_targets)
            loss = loss * (weight * acc.num_processes)
            if last and (penalty := strategy.step_penalty(info)) is not None:
                loss = loss + penalty
            nonfinite += float(not torch.isfinite(loss))
            acc.backward(loss)
        nll_sum += weight * nll.item()
    nll_sum, nonfinite = _sum_over_processes(acc, [nll_sum, nonfinite])  # one decision for all processes
    if nonfinite:
        raise DivergedError(f"{where}: loss is not finite; lower the learning rate (the last good weights were kept)")
    _average_module_grads(acc, strategy)
    strategy.after_backward(info)
    grad_norm = acc.clip_grad_norm_(parts.params, settings.max_grad_norm)
    if not torch.isfinite(torch.as_tensor(grad_norm)):
        raise DivergedError(f"{where}: gradient norm is {float(grad_norm)}; lower the learning rate (the last good "
                            "weights were kept)")
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    strategy.after_step(info)
    return nll_sum / step_targets


def _watch(loop: _Loop, step_loss: float, step_targets: int, parts: PhaseParts, where: str, console) -> None:
    """The loss guard's verdict on this step: back off (last good weights, halved learning rates) or stop."""
    guard, settings = loop.guard, parts.settings
    verdict = guard.observe(step_loss, step_targets)
    if verdict is None:
        return
    smoothed, lowest = guard.tripped
    rates = f"train.lr ({settings.lr:g})" + (f" or train.token_lr ({settings.token_lr:g})"
                                             if settings.token_lr is not None else "")
    parts.optimizer.zero_grad(set_to_none=True)
    _restore(parts.ctx.model, loop.best_state, parts.strategy)
    if verdict == "stop":
        raise DivergedError(f"{where}: the training loss keeps rising (smoothed {smoothed:.2f}, lowest {lowest:.2f}) "
                            f"after the learning rates were halved {guard.backed_off} times; lower {rates} "
                            "(the last good weights were kept)")
    for group in parts.optimizer.param_groups:
        group["lr"] *= 0.5
    parts.scheduler.base_lrs = [lr * 0.5 for lr in parts.scheduler.base_lrs]
    note = (f"{where}: the training loss rose (smoothed {smoothed:.2f}, lowest {lowest:.2f}): back to the last good "
            f"weights with every learning rate halved ({guard.backed_off} of {guard.backoffs}); lower {rates} to "
            "avoid this")
    if console is not None:
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    else:
        logger.warning(note)


def _average_module_grads(acc, strategy: Strategy) -> None:
    """A strategy's own modules sit outside the DDP-wrapped model: average their gradients here."""
    if acc.num_processes == 1:
        return
    for module in strategy.modules().values():
        for p in module.parameters():
            if p.grad is not None:
                p.grad.copy_(acc.reduce(p.grad, "mean"))


def _targets(encoded: list[list[int]], micro_batches: list[list[int]]) -> int:
    """Target tokens of a step: every token of an example after its context turns and speaker token."""
    return sum(target_count(encoded[i]) for mb in micro_batches for i in mb)


def _resume(checkpoints: StepCheckpoints, ctx: Context, strategy, optimizer, scheduler, log_path, plan_sha: str,
            data_sha: str) -> _Loop | None:
    """The loop state of the latest step checkpoint, loaded into the live objects (None: start fresh)."""
    folder = checkpoints.latest() if checkpoints.resume else None
    if folder is None:
        return None
    state, best, log_text = checkpoints.restore(folder, ctx.model, strategy, optimizer, scheduler,
                                                ctx.accelerator.device)
    if state["plan_sha256"] != plan_sha:
        raise UserError(f"{folder}: this phase's step plan differs from the checkpoint's (its training data or "
                        "settings "
                        "changed); resume with the same config and data, or pass --overwrite")
    if state["data_sha256"] != data_sha:
        logger.warning("%s: the phase's training utterances differ from the checkpoint's; continuing at step %d",
                       folder, state["step"])
    if log_path and ctx.accelerator.is_main_process:
        log_path.write_text(log_text, encoding="utf-8")
    # The passes the interrupted process had made in this phase count as this one's (the cost ledger).
    forward, backward = state.get("passes", (0, 0))
    ctx.scorer.forward_tokens += forward
    ctx.scorer.backward_tokens += backward
    return _Loop(PhaseResult(**state["result"]), best, state["since_best"], state["step"], state["elapsed_s"],
                 LossGuard(**state.get("guard", {})))


def _require_finite(model, where: str, best_state: dict[str, torch.Tensor], strategy: Strategy | None = None) -> None:
    """Before a checkpoint: never save non-finite weights over a good checkpoint."""
    if not all(torch.isfinite(p).all() for p in _trained(model, strategy).values()):
        _restore(model, best_state, strategy)
        raise DivergedError(f"{where}: weights are not finite; lower the learning rate (the last good checkpoint was "
                            "kept)")


def train_phase(
    ctx: Context, strategy: Strategy, task: TaskData, examples: list[Example], settings: PhaseSettings, phase: int,
    log_path: Path | None, checkpoints: StepCheckpoints | None = None, step_offset: int = 0,
) -> PhaseResult:
    """Train on `examples` (the strategy's `train_data(task)`); returns throughput and validation figures.

    With `checkpoints`, saves step checkpoints as it goes and, when its `resume` is set, first
    continues from the latest one. Trackers (if the accelerator has any) get each step's loss, learning
    rate and tokens/s and each validation loss at step `step_offset` + step (steps of earlier phases first).
    """
    acc = ctx.accelerator
    examples = require_no_test(examples, "training")
    encoded = ctx.encode(examples)
    pad_id = ctx.tokenizer.pad_token_id
    wide = ctx.base_dtype != torch.float32 or acc.device.type != "cpu"
    sizes = (token_budget(settings, acc.device), micro_batch(settings, wide=wide))
    windows = [e.window for e in examples]
    plan = plan_steps([len(s) for s in encoded], settings, ctx.seed + phase, *sizes, windows=windows)
    if strategy.shared_budget() and len(examples) > len(task.train):
        # Replayed utterances take new ones' places: as many steps as the task's own split gives.
        own = [(len(s), e.window) for e, s in zip(examples, encoded) if e.task == task.index]
        plan = plan[: len(plan_steps([n for n, _ in own], settings, ctx.seed + phase, *sizes,
                                     windows=[w for _, w in own]))]
    plan_sha, data_sha = fingerprint(plan), fingerprint(encoded)
    contrast = SpeakerContrast(examples, encoded, ctx.tasks, ctx.tokenizer, pad_id) if settings.speaker_loss else None
    pack = settings.pack_length if settings.packing else None
    # A window's lead (the turns before its first target) computed forward only, when asked (window_lead_grad).
    lead = any(w is not None for w in windows) and not settings.window_lead_grad and not strategy.whole_rows()

    # Model order for clipping: the gradient norm sums per-parameter norms, and the order sets its last bits.
    params = list(_trained(ctx.model, strategy).values())
    optimizer = torch.optim.AdamW(param_groups(ctx.model, settings, strategy), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    scheduler = get_scheduler(
        settings.schedule, optimizer, num_warmup_steps=round(settings.warmup_ratio * len(plan)),
        num_training_steps=len(plan)
    )
    scorer, optimizer = acc.prepare(ctx.scorer, optimizer)
    parts = PhaseParts(ctx, strategy, scorer, optimizer, scheduler, params, settings, contrast)
    # Mid-phase validation serves early stopping (or the curve `eval_every` asks for); otherwise the phase's end
    # is the one figure anything reads (the pipeline reuses it), so there is no mid-phase pass to pay for.
    per_epoch = max(1, math.ceil(len(plan) / math.ceil(settings.epochs)))
    val_every = settings.eval_every or (per_epoch if settings.early_stopping_patience else len(plan))

    counted = (ctx.scorer.forward_tokens, ctx.scorer.backward_tokens)  # model passes before this loop
    loop = None
    if checkpoints:
        loop = _resume(checkpoints, ctx, strategy, optimizer, scheduler, log_path, plan_sha, data_sha)
    loop = loop or _Loop(PhaseResult(), _trainable_snapshot(ctx.model, strategy))
    result = loop.result
    log = log_path.open("a", encoding="utf-8") if (log_path and acc.is_main_process) else None
    start = time.perf_counter() - loop.elapsed_s
    scorer.train()
    next_line = time.perf_counter() + PLAIN_PROGRESS_S
    with _progress(acc.is_main_process) as progress, interrupt.deferred():
        bar = progress.add_task(f"phase {phase + 1} · {task.name}", total=len(plan), completed=loop.step,
                                loss=float("nan"), tps=0.0)
        for step in range(loop.step + 1, len(plan) + 1):
            if result.stopped_early:
                break
            epoch, micro_batches = plan[step - 1]
            where = f"phase {phase + 1}, step {step}"
            set_seed(derived_seed(ctx.seed, phase, step, acc.process_index))  # dropout: same draws after a resume
            batches = [(collate(encoded, mb, pad_id, pack, merge=True, lead=lead), w)  # a window's targets: one row
                       for mb, w in my_share(micro_batches, acc.process_index, acc.num_processes)]
            step_targets = _targets(encoded, micro_batches)
            info = StepInfo(phase=phase, step=step, steps=len(plan), epoch=epoch)
            try:
                step_loss = _optimizer_step(StepWork(parts, batches, step_targets, sum(map(len, micro_batches)), info,
                                                     where))
            except DivergedError:
                optimizer.zero_grad(set_to_none=True)
                _restore(ctx.model, loop.best_state, strategy)
                raise

            loop.step = result.steps = step
            result.target_tokens += step_targets
            _watch(loop, step_loss, step_targets, parts, where, progress.console if acc.is_main_process else None)
            elapsed = time.perf_counter() - start
            tps = result.target_tokens / elapsed
            progress.update(bar, advance=1, loss=step_loss, tps=tps)
            if acc.is_main_process and not progress.console.is_terminal and time.perf_counter() >= next_line:
                # Redirected output (a log file, CI) gets no live bar: a plain line every PLAIN_PROGRESS_S instead.
                next_line = time.perf_counter() + PLAIN_PROGRESS_S
                eta = (len(plan) - step) * elapsed / step
                progress.console.print(f"phase {phase + 1} · {task.name}: step {step}/{len(plan)}, "
                                       f"loss {step_loss:.3f}, "
                                       f"{tps:.0f} tok/s, about {eta / 60:.1f} min left")
            acc.log({"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0], "train/tokens_per_s": tps},
                    step=step_offset + step)
            if log:
                row = {"phase": phase + 1, "task": task.name, "epoch": epoch + 1, "step": step,
                       "loss": round(step_loss, 5), "lr": scheduler.get_last_lr()[0],
                       "target_tokens": result.target_tokens, "tokens_per_s": round(tps, 1),
                       "elapsed_s": round(elapsed, 2)}
                log.write(json.dumps(row) + "\n")

            if step % val_every == 0 or step == len(plan):
                validating = time.perf_counter()
                val_ppl = perplexity(acc, ctx.scorer, ctx.tokenizer, require_no_test(task.val, "validation"),
                                     ctx.max_length,
                                     ctx.eval_batch_size)
                val = math.log(val_ppl)
                result.last_val = (served_fingerprint(ctx.model, strategy), val_ppl)
                scorer.train()
                result.val_losses.append(val)
                acc.log({"val/loss": val}, step=step_offset + step)
                if log:
                    log.write(json.dumps({"phase": phase + 1, "task": task.name, "step": step,
                                          "val_loss": round(val, 5)}) + "\n")
                if result.best_val_loss is None or val < result.best_val_loss:
                    snapshot = _trainable_snapshot(ctx.model, strategy)
                    result.best_val_loss, loop.best_state, loop.since_best = val, snapshot, 0
                else:
                    loop.since_best += 1
                    result.stopped_early = bool(settings.early_stopping_patience
                                                and loop.since_best >= settings.early_stopping_patience)
                result.validation_s += time.perf_counter() - validating
            stop = interrupt.requested(acc)  # Ctrl-C/SIGTERM: stop here, with a checkpoint of this very step
            if checkpoints and (stop or checkpoints.due(step, len(plan), result.stopped_early)):
                saving = time.perf_counter()
                _require_finite(ctx.model, where, loop.best_state, strategy)
                loop.elapsed_s = time.perf_counter() - start
                if log:
                    log.flush()
                if acc.is_main_process:
                    checkpoints.save(step, ctx.model, ctx.tokenizer, strategy.full_state(), optimizer, scheduler,
                                     {**loop.to_json(plan_sha, data_sha, epoch), "passes": [
                                         ctx.scorer.forward_tokens - counted[0],
                                         ctx.scorer.backward_tokens - counted[1]]},
                                     loop.best_state,
                                     log_path.read_text(encoding="utf-8") if log_path and log_path.exists() else "")
                result.checkpoint_s += time.perf_counter() - saving
            if stop:
                saved = ", after saving a step checkpoint" if checkpoints else ""
                raise interrupt.Interrupted(stop, f"in phase {phase + 1} at step {step} of {len(plan)}{saved}")
    if log:
        log.close()
    result.guard_backoffs = loop.guard.backed_off
    if settings.early_stopping_patience:
        _restore(ctx.model, loop.best_state, strategy)  # keep the best validated weights, as early stopping promises
    acc.unwrap_model(scorer, keep_fp32_wrapper=False)  # fp16 autocast: evaluation after training runs without it
    acc.free_memory()
    release_free_memory()  # what the loop's activations left fragmented, before evaluation and after_task
    scorer.eval()
    result.wall_s = time.perf_counter() - start
    result.tokens_per_s = result.target_tokens / max(result.wall_s, 1e-9)
    return result


def served_fingerprint(model, strategy) -> str:
    """A digest of everything training and strategies change in what the model computes: the active
    adapters, every adapter weight and trainable parameter, and the strategy's own modules (the frozen
    base never changes)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or is_adapter_weight(n)]
    named += [(f"module.{m}.{n}", p) for m, module in strategy.modules().items() for n, p in module.named_parameters()]
    return weights_digest(named, header=repr(getattr(model, "active_adapters", None)))
