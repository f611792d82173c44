"""Sampling continuations in a speaker's style: the speaker token, then the prompt."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_text(
    model, tokenizer, speaker_token: str, prompt: str = "", *, max_new_tokens: int = 40,
    temperature: float = 0.8, top_p: float = 0.95, seed: int = 0,
) -> str:
    ids = [tokenizer.convert_tokens_to_ids(speaker_token)] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=inputs,
        attention_mask=torch.ones_like(inputs),
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
