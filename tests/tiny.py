"""A tiny Llama with a BPE tokenizer trained on the fly, saved as a local model folder.

Tests and the notebook's quick mode use it instead of the bundled model: it is built from a
config in a second, never touches the network, and `model.name: FOLDER` loads it like any model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def train_tiny_tokenizer(folder: str | Path, texts: Iterable[str], vocab_size: int = 300, bos: bool = True):
    """A byte-level BPE tokenizer trained on `texts` (`<unk>`, end token `</s>`, with `bos` a beginning-of-sequence
    token `<s>` as the bundled model's tokenizer has one), saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # The whole byte alphabet up front: any text stays encodable, none of it maps to <unk>.
    specials = ["<unk>", "</s>"] + (["<s>"] if bos else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   **({"bos_token": "<s>"} if bos else {}))
    fast.save_pretrained(folder)
    return fast


def write_tiny_model(folder: str | Path, texts: Iterable[str], *, vocab_size: int = 300, hidden_size: int = 32,
                     layers: int = 2, max_positions: int = 128, seed: int = 0, bos: bool = True) -> Path:
    """Write a randomly initialized `layers`-layer Llama (tied embeddings) and its tokenizer to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer(folder, texts, vocab_size, bos)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
