"""Phase and step checkpoints: adapters and strategy state (safetensors), tokenizer, resolved config,
router; written and verified whole (`cltune.storage.verified`), loaded into a live model or a fresh one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from cltune.config import ModelSettings
from cltune.errors import UserError
from cltune.storage.files import read_json, write_json
from cltune.storage.verified import verify as verify_folder
from cltune.storage.verified import write_folder

META = "checkpoint.json"
STRATEGY_STATE = "strategy_state.safetensors"


def verify(folder: str | Path) -> None:
    """Refuse a checkpoint with a missing or damaged manifest, or files that are missing or changed."""
    verify_folder(folder, required=(META,))


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
        loaded = set_peft_model_state_dict(model, load_file(str(source / "adapter_model.safetensors")),
                                           adapter_name=adapter)
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

    from cltune.modeling.model import load_base, resize_for

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
