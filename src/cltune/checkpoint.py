"""Phase and step checkpoints: adapters (safetensors), tokenizer, resolved config, with a manifest of
sizes and SHA-256 hashes. Written to a temporary folder, synced and renamed, so a crash (or kill -9,
or a full disk) never leaves half a checkpoint and never harms the previous one; a checkpoint whose
files do not match its manifest is refused."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from cltune.config import ModelSettings
from cltune.errors import UserError
from cltune.files import read_json, write_json

MANIFEST = "manifest.json"
META = "checkpoint.json"
STRATEGY_STATE = "strategy_state.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    write_json(folder / MANIFEST, {"files": entries})


def _manifest_entries(folder: Path) -> dict:
    """The manifest's file entries; a manifest that is itself damaged is a refusal, not a traceback."""
    try:
        entries = read_json(folder / MANIFEST)["files"]
        checked = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{folder}: {MANIFEST} is unreadable or damaged; this checkpoint cannot be trusted") from None
    if META not in checked or any(Path(k).is_absolute() or ".." in Path(k).parts for k in checked):
        raise UserError(f"{folder}: {MANIFEST} does not describe a cltune checkpoint; this checkpoint cannot be trusted")
    return checked


def verify(folder: str | Path) -> None:
    """Refuse a checkpoint with a missing or damaged manifest, or files that are missing or changed."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise UserError(f"{folder}: not a complete cltune checkpoint (no {MANIFEST}); point at a phase folder or re-run")
    for name, (size, digest) in _manifest_entries(folder).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size or _sha256(path) != digest:
            raise UserError(f"{folder}: {name} is missing or corrupted (does not match {MANIFEST}); this checkpoint "
                            "cannot be used: re-run that phase, or delete a damaged step checkpoint to resume from an earlier one")


TEMP_SUFFIX = ".tmp"  # every temporary file or folder ends so; leftovers of a crash are safe to delete
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _fsync_tree(folder: Path) -> None:
    """Flush every file and the folder itself, so the rename publishes data that is on disk."""
    for path in [*sorted(p for p in folder.rglob("*") if p.is_file()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_folder(folder: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with `fill(tmp)` in a temporary sibling, add its manifest, then swap it in.

    Until the final rename the previous folder is untouched, so any failure (a full disk
    included) leaves it intact; a full disk becomes a `UserError` that says so.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=TEMP_SUFFIX))
    try:
        fill(tmp)
        _write_manifest(tmp)
        _fsync_tree(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old{TEMP_SUFFIX}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in _DISK_FULL:
            raise UserError(f"{folder}: no space left on device while saving; the previous checkpoint is unchanged. "
                            "Free disk space, then continue with `cltune run CONFIG --resume`") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def remove_temp_leftovers(folder: str | Path) -> None:
    """Delete what a killed writer left behind (hidden names ending in .tmp); never a finished file."""
    folder = Path(folder)
    for path in folder.glob(f".*{TEMP_SUFFIX}") if folder.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def save_checkpoint(folder: str | Path, model: PeftModel, tokenizer, meta: dict, files: dict[str, str] | None = None,
                    tensors: dict | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint atomically; `extra(tmp)` may add more files (a step checkpoint's training state)."""

    def fill(tmp: Path) -> None:
        # save_embedding_layers=False: the new token rows are saved by PEFT's trainable-token delta;
        # the resized full embedding matrix (100+ MB) never changes and is rebuilt on load.
        model.save_pretrained(tmp, safe_serialization=True, selected_adapters=list(model.peft_config),
                              save_embedding_layers=False)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / META, {**meta, "adapters": list(model.peft_config), "active_adapter": model.active_adapter})
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STRATEGY_STATE))
        if extra:
            extra(tmp)

    return write_folder(folder, fill)


def _adapter_folder(folder: Path, adapter: str) -> Path:
    """Where PEFT's save_pretrained puts an adapter: the folder itself for `default`, else a subfolder."""
    return folder if adapter == "default" else folder / adapter


def load_adapter_weights(model: PeftModel, folder: str | Path) -> dict:
    """Load a verified checkpoint's adapters into a live model (to resume); returns its meta.

    Adapters the model lacks (a strategy added them in a finished phase) are created from the
    checkpoint; the rest get their weights replaced. The values are exactly the saved ones.
    """
    folder = Path(folder)
    verify(folder)
    meta = read_json(folder / META)
    for adapter in meta["adapters"]:
        source = _adapter_folder(folder, adapter)
        if adapter not in model.peft_config:
            model.load_adapter(source, adapter_name=adapter, is_trainable=True)
        loaded = set_peft_model_state_dict(model, load_file(str(source / "adapter_model.safetensors")), adapter_name=adapter)
        if loaded.unexpected_keys:
            raise UserError(f"{folder}: adapter {adapter!r} does not fit this model ({loaded.unexpected_keys[0]}); "
                            "resume with the run's own config or pass --overwrite")
    active = meta.get("active_adapter")
    if isinstance(active, str) and model.active_adapter != active:
        model.set_adapter(active)
    return meta


def load_checkpoint(folder: str | Path, model_settings: ModelSettings | None = None):
    """(PeftModel, tokenizer, meta) from a verified checkpoint folder, on the CPU, in eval mode."""
    from transformers import AutoTokenizer

    from cltune.model import load_base, resize_for

    folder = Path(folder)
    verify(folder)
    meta = read_json(folder / META)
    settings = model_settings or ModelSettings(**meta["model"])
    base, _ = load_base(settings)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    resize_for(base, tokenizer)
    adapters = meta["adapters"]
    model = PeftModel.from_pretrained(base, _adapter_folder(folder, adapters[0]), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.load_adapter(_adapter_folder(folder, name), adapter_name=name)
    model.set_adapter(meta["active_adapter"] if isinstance(meta["active_adapter"], str) else adapters[0])
    model.eval()
    return model, tokenizer, meta


def load_strategy_state(folder: str | Path) -> dict:
    path = Path(folder) / STRATEGY_STATE
    return load_file(str(path)) if path.exists() else {}


def checkpoint_meta(folder: str | Path) -> dict:
    return json.loads((Path(folder) / META).read_text(encoding="utf-8"))
