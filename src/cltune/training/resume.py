"""Resuming a stream after a crash: step checkpoints inside a phase (which run a folder holds: `rundir`).

A step checkpoint is a phase-style checkpoint (adapters, tokenizer, manifest) plus what the loop
needs to continue exactly: optimizer and scheduler (`torch.save`, read back with
`weights_only=True`), the strategy's `state()` and the best validated weights (safetensors), and
the loop's counters and position in the phase's step plan (JSON). Randomness needs no saved
state: every optimizer step reseeds from (run seed, phase, step, process), so step k draws the
same numbers whether or not the run stopped before it, under any number of processes.
"""

from __future__ import annotations

import io
import logging
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cltune.errors import UserError
from cltune.modeling.checkpoint import load_adapter_weights, load_strategy_state, save_checkpoint
from cltune.storage.files import read_json, write_json
from cltune.storage.verified import remove_temp_leftovers

log = logging.getLogger(__name__)
STEPS_DIR = "steps"
STEP_STATE = "state.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
BEST_WEIGHTS = "best_weights.safetensors"
TRAIN_LOG = "train_log.jsonl"


def _torch_save(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getvalue())


def _torch_load(path: Path):
    """Tensors and plain containers only (weights_only): a file holding any other pickled object is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: holds more than tensors and plain values; refusing to unpickle it "
                        "(delete that step checkpoint to resume from an earlier one)") from None


@dataclass
class StepCheckpoints:
    """Where one phase keeps its step checkpoints, how often, how many, and whether to resume."""

    folder: Path  # RUN/steps/phaseK
    every: int | None
    keep: int
    meta: dict  # as a phase checkpoint's (model, phase, task, speaker tokens): `cltune generate` reads either
    resume: bool = False  # continue from the latest step checkpoint, when there is one
    # The phase's set-up before its loop (start figures, set-up passes and costs, hook time), saved with
    # every step checkpoint so a resumed phase reports what the uninterrupted one would
    setup: dict = field(default_factory=dict)

    def due(self, step: int, last: int, stopped: bool) -> bool:
        """Every `every` steps, and at the end of training so a crash in after_task/evaluation loses no steps."""
        return step == last or stopped or bool(self.every and step % self.every == 0)

    def latest(self) -> Path | None:
        steps = sorted(p for p in self.folder.glob("step-*") if p.is_dir())
        return steps[-1] if steps else None

    def latest_setup(self) -> dict | None:
        """The set-up record of the step checkpoint a resume would continue from (None: no resume, no
        checkpoint, or one written before set-ups were recorded)."""
        folder = self.latest() if self.resume else None
        if folder is None:
            return None
        try:
            setup = read_json(folder / STEP_STATE).get("setup")
        except (OSError, ValueError, AttributeError):
            return None  # restoring it reports the damage with the file's name
        return setup if isinstance(setup, dict) and {"before", "hooks_s", "costs", "passes"} <= setup.keys() else None

    def save(self, step: int, model, tokenizer, strategy_state: dict, optimizer, scheduler, loop: dict,
             best_weights: dict, log_text: str) -> Path:
        """Write step checkpoint `step` atomically, then drop all but the newest `keep`."""

        def training_state(tmp: Path) -> None:
            _torch_save(optimizer.state_dict(), tmp / OPTIMIZER)
            _torch_save(scheduler.state_dict(), tmp / SCHEDULER)
            save_file({k: v.detach().contiguous().cpu() for k, v in best_weights.items()}, str(tmp / BEST_WEIGHTS))
            write_json(tmp / STEP_STATE, {**loop, "setup": self.setup})
            (tmp / TRAIN_LOG).write_text(log_text, encoding="utf-8")

        path = save_checkpoint(self.folder / f"step-{step:06d}", model, tokenizer, meta={**self.meta, "step": step},
                               tensors=strategy_state or None, extra=training_state)
        self._prune()
        return path

    def _prune(self) -> None:
        remove_temp_leftovers(self.folder)
        for old in sorted(p for p in self.folder.glob("step-*") if p.is_dir())[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, folder: Path, model, strategy, optimizer, scheduler, device) -> tuple[dict, dict, str]:
        """Load a verified step checkpoint into the live objects; returns (loop state, best weights, log)."""
        load_adapter_weights(model, folder)  # verifies the manifest first
        strategy.load_full_state({k: v.to(device) for k, v in load_strategy_state(folder).items()})
        optimizer.load_state_dict(_torch_load(folder / OPTIMIZER))
        scheduler.load_state_dict(_torch_load(folder / SCHEDULER))
        best = {k: v.to(device) for k, v in load_file(str(folder / BEST_WEIGHTS)).items()}
        return read_json(folder / STEP_STATE), best, (folder / TRAIN_LOG).read_text(encoding="utf-8")


def steps_folder(run_dir: Path, phase: int) -> Path:
    """RUN/steps/phaseK for 0-based `phase`."""
    return run_dir / STEPS_DIR / f"phase{phase + 1}"


def restore_phase(ctx, strategy, folder: Path) -> None:
    """Put the model and strategy where the uninterrupted run was at the end of that phase."""
    load_adapter_weights(ctx.model, folder)
    strategy.load_full_state({k: v.to(ctx.accelerator.device) for k, v in load_strategy_state(folder).items()})
