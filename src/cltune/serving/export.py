"""`cltune export`: a checkpoint as a model that runs without cltune.

- **merged** (default): a plain Hugging Face model folder (safetensors, the extended tokenizer with the
  speaker tokens, a generation config) that `AutoModelForCausalLM.from_pretrained` loads without cltune
  or PEFT. The weights are what the checkpoint's router serves, read off the live model: each adapted
  linear layer's effective matrix is probed with the identity (exact for anything linear in its input —
  one adapter, progressive's lateral gains, a fixed mix), then checked on random inputs, so a mix that
  depends on the input (fusion's gate) is refused rather than approximated; the embedding rows
  (speaker tokens included) are read by looking every token up.
- **adapter** (`--adapter`): a standard PEFT adapter folder with the tokenizer, for strategies whose
  served weights are one adapter.
- **GGUF** (`--gguf f16|q8_0`): the merged model as one GGUF file for llama.cpp (`export_gguf`).

What is exported: one model for strategies with one model; for per-task ones, the weights the router
gives `--speaker`, or, without it, one folder per dataset (the weights that dataset's oracle row scored).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from cltune.errors import UserError
from cltune.serving.export_gguf import GGUF_TYPES, source_pre_tokenizer, write_gguf
from cltune.storage.files import write_json

EXPORT_NOTE = "cltune_export.json"
LINEAR_TOLERANCE = 1e-4  # relative error of the probed matrix on random inputs above which a layer is not linear
ONE_ADAPTER_ROUTERS = ("single", "adapters", "fixed")  # routers whose served weights are one PEFT adapter


def _token_wrapper(module: nn.Module) -> bool:
    return hasattr(module, "token_adapter")


@torch.no_grad()
def effective_linear(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the affine map an adapted linear layer computes now (adapters, hooks and all)."""
    base = layer.get_base_layer()
    eye = torch.eye(base.in_features, dtype=base.weight.dtype, device=base.weight.device)
    zero = layer(torch.zeros(1, base.in_features, dtype=eye.dtype, device=eye.device))[0]
    weight = (layer(eye) - zero).T.contiguous()
    probe = torch.randn(8, base.in_features, generator=torch.Generator().manual_seed(0)).to(eye)
    expected = layer(probe)
    error = (probe @ weight.T + zero - expected).norm() / expected.norm().clamp_min(1e-12)
    if error > LINEAR_TOLERANCE:
        raise UserError(f"{name}: the served weights depend on the input (relative error {error:.1e} of a fixed "
                        "matrix), as fusion's gate does; such a checkpoint cannot be merged into one model — serve "
                        "it with cltune generate/chat")
    return weight, (zero if base.bias is not None else None)


@torch.no_grad()
def served_weights(model) -> dict[str, torch.Tensor]:
    """The plain model's parameters that the live PEFT model's serving changes: every adapted linear layer's
    effective weight (and bias) and the full rows of every embedding with trainable token rows."""
    out: dict[str, torch.Tensor] = {}
    base = model.get_base_model()
    tied = bool(getattr(base.config, "tie_word_embeddings", False))  # the head's rows are the embedding's
    was_training = base.training
    base.eval()
    try:
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), nn.Linear):
                weight, bias = effective_linear(module, name)
                out[f"{name}.weight"] = weight
                if bias is not None:
                    out[f"{name}.bias"] = bias
            elif _token_wrapper(module):
                inner = module.token_adapter.base_layer
                if isinstance(inner, nn.Embedding):
                    out[f"{name}.weight"] = module(torch.arange(inner.num_embeddings, device=inner.weight.device))
                elif isinstance(inner, nn.Linear) and not tied:  # an untied output head with its own rows
                    eye = torch.eye(inner.in_features, dtype=inner.weight.dtype, device=inner.weight.device)
                    out[f"{name}.weight"] = module(eye).T.contiguous()
    finally:
        base.train(was_training)
    return out


def plain_model(meta: dict, tokenizer, weights: dict[str, torch.Tensor]):
    """A fresh copy of the base model (resized to the tokenizer) with `weights` written in."""
    from cltune.config import ModelSettings
    from cltune.modeling.model import load_base, resize_for

    model, _ = load_base(ModelSettings(**meta["model"]))
    resize_for(model, tokenizer)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, value in weights.items():
        if name not in params:
            raise UserError(f"export: {name} is not a parameter of the base model; the checkpoint does not fit it")
        params[name].data.copy_(value)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _selections(router, meta: dict, speaker_token: str | None) -> Iterator[tuple[str | None, AbstractContextManager]]:
    """(sub-folder or None, the weights to export) for what was asked."""
    if speaker_token is not None:
        choices = router.agnostic_choices(speaker_token)
        if len(choices) > 1:
            raise UserError(f"export: {speaker_token} is served by a mixture of {len(choices)} datasets' weights (a "
                            "speaker they share); export without --speaker for one folder per dataset")
        yield None, router.agnostic(speaker_token)
    elif not router.task_routed:
        yield None, router.oracle(0)
    else:
        tasks = meta.get("tasks")
        if not tasks:
            raise UserError("export: this checkpoint does not list its datasets (saved by an older cltune); pass "
                            "--speaker NAME to export the weights that speaker is served by")
        for index, task in enumerate(tasks[: meta["phase"]]):
            yield task["name"], router.oracle(index)


def export_checkpoint(checkpoint: Path, out: Path, *, speaker: str | None = None, adapter: bool = False,
                      gguf: str | None = None) -> list[Path]:
    """Write the export(s) of `checkpoint` under `out` (each folder built aside and swapped in whole); returns the
    folders written. A folder that exists must be empty or an earlier export."""
    from cltune.serving.chat import Talker
    from cltune.storage.files import writable_folder
    from cltune.storage.verified import write_folder

    writable_folder(out if out.exists() else out.parent, "export")  # before the model loads
    talker = Talker(checkpoint)
    token = talker.token(speaker) if speaker else None
    kind = talker.router.kind
    if adapter and gguf:
        raise UserError("export: --adapter and --gguf are two formats; pick one")
    if gguf and gguf not in GGUF_TYPES:
        raise UserError(f"export: unknown --gguf type {gguf!r}; choose one of {', '.join(GGUF_TYPES)}")
    if adapter and kind not in ONE_ADAPTER_ROUTERS:
        raise UserError(f"{checkpoint}: the {kind} router serves several adapters at once, not one PEFT adapter; "
                        "export the merged model (without --adapter) instead")
    selections = list(_selections(talker.router, talker.meta, token))
    folders = [out / sub if sub else out for sub, _ in selections]
    for folder in folders:
        if folder.exists() and any(folder.iterdir()) and not (folder / EXPORT_NOTE).exists():
            raise UserError(f"{folder}: exists and is not a cltune export; pass a new or empty folder to --out")

    for folder, (sub, weights) in zip(folders, selections):
        def fill(tmp: Path, sub: str | None = sub) -> None:
            if adapter:
                _write_adapter(talker, tmp)
            elif gguf:
                model = plain_model(talker.meta, talker.tokenizer, served_weights(talker.model))
                write_gguf(model, talker.tokenizer, tmp / f"model-{gguf}.gguf", gguf,
                           source_pre_tokenizer(talker.meta["model"]["name"]), add_bos=bool(talker.start))
            else:
                model = plain_model(talker.meta, talker.tokenizer, served_weights(talker.model))
                model.save_pretrained(tmp, safe_serialization=True)
                talker.tokenizer.save_pretrained(tmp)
            kind_written = "peft-adapter" if adapter else f"gguf-{gguf}" if gguf else "merged"
            write_json(tmp / EXPORT_NOTE, {"checkpoint": str(checkpoint), "router": kind, "speaker": speaker,
                                           "dataset": sub, "format": kind_written,
                                           "speaker_tokens": talker.tokens, "context_turns": talker.trained_turns,
                                           "prompt": _prompt_layout(talker)})

        with weights:
            write_folder(folder, fill)
        _readable(folder)
    return folders


def _prompt_layout(talker) -> str:
    """How a prompt to the exported model is laid out, as training laid out its rows."""
    start = talker.tokenizer.convert_ids_to_tokens(talker.start[0]) + " " if talker.start else ""
    end = talker.tokenizer.eos_token or ""
    return f"{start}[<SPEAKER> earlier turn {end} ...] <SPEAKER> (the reply follows)"


def _readable(folder: Path) -> None:
    """An export is meant to be shared and served (Ollama runs as its own user): world-readable, unlike the
    private temporary folder and files it was built in."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _write_adapter(talker, tmp: Path) -> None:
    model = talker.model
    name = model.active_adapter
    staging = tmp / ".peft"
    model.save_pretrained(staging, selected_adapters=[name], save_embedding_layers=False, safe_serialization=True)
    source = staging if name == "default" else staging / name
    for item in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.move(str(source / item), str(tmp / item))
    shutil.rmtree(staging)
    config = json.loads((tmp / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = talker.meta["model"]["name"]
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    talker.tokenizer.save_pretrained(tmp)
