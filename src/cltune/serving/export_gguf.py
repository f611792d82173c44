"""A merged Llama-family model as one GGUF file (f16 or q8_0) for llama.cpp, Ollama and LM Studio, written
with the `gguf` package: llama.cpp's tensor names and layout, the hyperparameters, and the byte-level BPE
tokenizer with the added speaker and pad tokens (marked as control tokens, so they stay whole).

Query and key projections are stored in llama.cpp's rotary layout (each head's halves interleaved), the
permutation llama.cpp's own converter applies and every GGUF reader undoes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cltune.errors import UserError

GGUF_TYPES = ("f16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values


def _rotary_layout(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's (heads · 2 · half, in) query/key rows → llama.cpp's (heads · half · 2, in)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tokenizer_metadata(writer, tokenizer, pre: str, add_bos: bool) -> None:
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend.get("model", {}).get("type") != "BPE":
        raise UserError("export --gguf: only byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) are written")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    for setter, value in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if value is not None:
            setter(value)
    writer.add_add_bos_token(add_bos)  # the start token training put before every row (`start_token` checkpoints)


def write_gguf(model, tokenizer, path: Path, kind: str, pre: str = "gpt2", add_bos: bool = True) -> Path:
    """Write `model` (a plain Llama-family causal LM) and `tokenizer` to the GGUF file `path` (`kind` f16 or q8_0);
    `add_bos`: llama.cpp begins every prompt with the BOS token, as cltune's training rows begin."""
    import gguf

    config = model.config
    if config.model_type != "llama":
        raise UserError(f"export --gguf: writes Llama-family models only (this one is {config.model_type!r}); export "
                        "the merged folder and convert it with llama.cpp's converter")
    if kind not in GGUF_TYPES:
        raise UserError(f"export --gguf: unknown type {kind!r}; choose one of {', '.join(GGUF_TYPES)}")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 10000.0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(getattr(config, "name_or_path", "") or "cltune export")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    _tokenizer_metadata(writer, tokenizer, pre, add_bos and tokenizer.bos_token_id is not None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            if "rotary_emb" in name:
                continue
            raise UserError(f"export --gguf: no GGUF name for {name}; this architecture is not supported")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if ".attn_q." in target:
            data = _rotary_layout(data, heads)
        elif ".attn_k." in target:
            data = _rotary_layout(data, kv_heads)
        if data.ndim == 1:
            writer.add_tensor(target, data.astype(np.float32))
        elif kind == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
            writer.add_tensor(target, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(target, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def source_pre_tokenizer(model_name: str) -> str:
    """The `tokenizer.ggml.pre` of the GGUF the bundled model came from (llama.cpp picks its text splitting by
    it); "gpt2" for any other base model."""
    from cltune.modeling.model import BUNDLED_ALIASES, bundled_gguf

    if model_name not in BUNDLED_ALIASES:
        return "gpt2"
    from gguf import GGUFReader

    field = GGUFReader(str(bundled_gguf())).fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[field.data[0]]).decode() if field is not None else "gpt2"
