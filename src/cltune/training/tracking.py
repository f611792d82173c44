"""Experiment tracking through Accelerate's trackers (`--log-with tensorboard`, `wandb`, `mlflow`).

Nothing is logged unless asked. A run logs, against the optimizer step counted over the whole stream:
`train/loss`, `train/lr`, `train/tokens_per_s` every step, `val/loss` at each validation, and after
each phase `test_ppl/<task>`, `attribution/<task>` and `forgetting_pct/<task>` (the rise of an earlier
task's test PPL over its just-learned value) for the matrix row just scored. TensorBoard writes under
RUN/logs/; wandb and mlflow use their own settings (`WANDB_MODE=offline`, `MLFLOW_TRACKING_URI`).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

from cltune.errors import UserError
from cltune.evaluation import metrics as cl_metrics

# tracker → (a module that must import, the install command)
TRACKERS = {"tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
            "wandb": (("wandb",), "pip install wandb"), "mlflow": (("mlflow",), "pip install mlflow")}


def check_trackers(names: Sequence[str]) -> list[str]:
    """The trackers asked for, each known and installed; a one-line error naming the install command otherwise."""
    chosen = []
    for name in names:
        key = name.strip().lower()
        if key not in TRACKERS:
            raise UserError(f"--log-with {name!r}: unknown tracker; choose from {', '.join(TRACKERS)}")
        modules, install = TRACKERS[key]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise UserError(f"--log-with {key}: the {modules[0]} package is not installed; run `{install}`")
        chosen.append(key)
    return list(dict.fromkeys(chosen))


def flat_settings(tree: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as flat `section/key` scalars (lists and None as text): what trackers store as
    hyperparameters."""
    out: dict[str, str | int | float | bool] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def phase_scalars(tasks: list[str], ppl: list[list[float]], attribution: list[list[float | None]]) -> dict[str, float]:
    """The scalars of the latest matrix row: each task's test PPL and attribution, and each learned earlier task's
    forgetting (final vs just learned, in %)."""
    learned = len(ppl) - 1  # tasks learned so far: the matrix of their columns is a complete one
    values = {f"test_ppl/{t}": v for t, v in zip(tasks, ppl[-1])}
    values.update({f"attribution/{t}": a for t, a in zip(tasks, attribution[-1])
                   if a is not None and not math.isnan(a)})
    so_far = cl_metrics.forgetting_pct([row[:learned] for row in ppl])
    values.update({f"forgetting_pct/{t}": v for t, v in zip(tasks, so_far)})
    return values
