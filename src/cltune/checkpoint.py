"""Phase checkpoints: adapters (safetensors), tokenizer, resolved config, with a manifest of sizes
and SHA-256 hashes. Written to a temporary folder and renamed, so a crash never leaves half a
checkpoint; a checkpoint whose files do not match its manifest is refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel
from safetensors.torch import load_file, save_file

from cltune.config import ModelSettings
from cltune.errors import UserError
from cltune.files import read_json, write_json

MANIFEST = "manifest.json"
META = "checkpoint.json"


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


def verify(folder: str | Path) -> None:
    """Refuse a checkpoint with a missing manifest, or files that are missing or changed."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        raise UserError(f"{folder}: not a complete cltune checkpoint (no {MANIFEST}); point at a phase folder or re-run")
    for name, entry in read_json(folder / MANIFEST)["files"].items():
        path = folder / name
        if not path.exists() or path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise UserError(f"{folder}: {name} is missing or corrupted (does not match {MANIFEST}); re-run that phase")


def save_checkpoint(folder: str | Path, model: PeftModel, tokenizer, meta: dict, files: dict[str, str] | None = None,
                    tensors: dict | None = None) -> Path:
    """Write a checkpoint atomically: build it in a temporary sibling, then swap it in."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        # save_embedding_layers=False: the new token rows are saved by PEFT's trainable-token delta;
        # the resized full embedding matrix (100+ MB) never changes and is rebuilt on load.
        model.save_pretrained(tmp, safe_serialization=True, selected_adapters=list(model.peft_config),
                              save_embedding_layers=False)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / META, {**meta, "adapters": list(model.peft_config), "active_adapter": model.active_adapter})
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "strategy_state.safetensors"))
        _write_manifest(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


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
    model = PeftModel.from_pretrained(base, folder if adapters[0] == "default" else folder / adapters[0], adapter_name=adapters[0])
    for name in adapters[1:]:
        model.load_adapter(folder / name, adapter_name=name)
    model.set_adapter(meta["active_adapter"] if isinstance(meta["active_adapter"], str) else adapters[0])
    model.eval()
    return model, tokenizer, meta


def load_strategy_state(folder: str | Path) -> dict:
    path = Path(folder) / "strategy_state.safetensors"
    return load_file(str(path)) if path.exists() else {}


def checkpoint_meta(folder: str | Path) -> dict:
    return json.loads((Path(folder) / META).read_text(encoding="utf-8"))
