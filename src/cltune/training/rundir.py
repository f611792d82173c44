"""Which run a run folder holds: refusing to overwrite one, recognizing the same run on --resume
(same config, checkpoint frequency aside, and same data files), and the bookkeeping of a fresh
start and of a finished phase."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable
from pathlib import Path

import yaml

from cltune.errors import DamagedFile, UserError
from cltune.evaluation.results import RunMetrics
from cltune.storage.files import read_json, write_json
from cltune.storage.verified import remove_temp_leftovers
from cltune.training.resume import STEPS_DIR, steps_folder

INPUTS = "inputs.json"
RESOLVED = "config.resolved.yaml"
# Settings that change where and how often checkpoints go, never a result: a resume may differ in them.
_NO_EFFECT = ("checkpoint_every", "save_total_limit")


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").exists() or (run_dir / RESOLVED).exists()


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to start over a folder that holds a run unless told to replace or continue it."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume contradict each other; pass one of them")
    if overwrite or resume or not holds_run(run_dir):
        return
    raise UserError(f"{run_dir}: already holds a run; pass --overwrite to replace it, --resume to continue it, "
                    "or choose another run folder (run, demo: --set name=NEW; train: another --out)")


def input_hashes(config) -> list[dict]:
    """SHA-256 of every task file, so a resume can tell that the data changed under it."""
    out = []
    for spec in config.tasks:
        try:
            digest = hashlib.sha256(Path(spec.path).read_bytes()).hexdigest()
        except OSError:
            digest = None  # loading reports a missing file with its own message
        out.append({"path": str(spec.path), "sha256": digest})
    return out


def _comparable(resolved: str) -> dict:
    tree = yaml.safe_load(resolved) or {}
    if not isinstance(tree, dict):
        raise ValueError("not a mapping")
    tree.pop("output_dir", None)  # where the folder is: the same run read through another path, or moved
    for section in [tree.get("train") or {}, *(tree.get("phases") or [])]:
        for key in _NO_EFFECT:
            section.pop(key, None)
    return tree


def _first_difference(a, b, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            found = _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _first_difference(x, y, f"{where}.{i}"))), None)
    return None if a == b else f"{where or '(top level)'} (saved {a!r}, now {b!r})"


def config_difference(run_dir: Path, resolved: str, ignore: Iterable[str] = ()) -> str | None:
    """Where the config of the run in `run_dir` differs from `resolved` (checkpoint frequency aside);
    None when they are the same run's."""
    path = run_dir / RESOLVED
    try:
        return text_difference(path.read_text(encoding="utf-8"), resolved, ignore)
    except (ValueError, yaml.YAMLError):  # undecodable, unparsable or not a mapping
        raise DamagedFile(f"{path}: damaged (not the config cltune wrote); restore it, or pass --overwrite to start "
                          "over") from None


def text_difference(saved_text: str, resolved: str, ignore: Iterable[str] = ()) -> str | None:
    """Where two resolved configs differ, checkpoint frequency and the top-level sections in `ignore` aside."""
    saved, now = _comparable(saved_text), _comparable(resolved)
    for section in ignore:
        saved.pop(section, None)
        now.pop(section, None)
    return _first_difference(saved, now)


def saved_progress(run_dir: Path, resolved: str, inputs: list[dict]) -> RunMetrics | None:
    """The metrics saved so far by the run in `run_dir` (None when it has none), after checking that
    it is the same run: same config (checkpoint frequency aside) and same data files."""
    if not (run_dir / RESOLVED).exists():
        return None
    diff = config_difference(run_dir, resolved)
    if diff:
        raise UserError(f"{run_dir}: holds a different run (config differs at {diff}); resume with the same config, "
                        "or pass --overwrite to replace it")
    saved_inputs = read_json(run_dir / INPUTS) if (run_dir / INPUTS).exists() else inputs
    if not (isinstance(saved_inputs, list) and all(isinstance(i, dict) and "sha256" in i for i in saved_inputs)):
        raise DamagedFile(f"{run_dir / INPUTS}: damaged (not the list of data files cltune wrote); restore it, or pass "
                          "--overwrite to start over")
    for old, new in zip(saved_inputs, inputs):
        if old["sha256"] != new["sha256"]:
            raise UserError(f"{new['path']}: changed since the run in {run_dir} started; resume needs the same data, "
                            "or pass --overwrite to start over")
    return RunMetrics.read(run_dir / "metrics.json") if (run_dir / "metrics.json").exists() else None


def start_fresh(run_dir: Path, inputs: list[dict]) -> None:
    """Forget an earlier run's progress (its step checkpoints, metrics and tracker logs) and record the inputs."""
    shutil.rmtree(run_dir / STEPS_DIR, ignore_errors=True)
    shutil.rmtree(run_dir / "logs", ignore_errors=True)
    (run_dir / "metrics.json").unlink(missing_ok=True)
    write_json(run_dir / INPUTS, inputs)


def finish_phase(run_dir: Path, phase: int) -> None:
    """A phase's step checkpoints are superseded once its phase checkpoint and metrics are written."""
    shutil.rmtree(steps_folder(run_dir, phase), ignore_errors=True)
    if (run_dir / STEPS_DIR).is_dir() and not any((run_dir / STEPS_DIR).iterdir()):
        (run_dir / STEPS_DIR).rmdir()
    remove_temp_leftovers(run_dir)
