"""The anchor: the smallest honest PEFT + PyTorch training loop, to hold cltune's loop against.

What a practitioner writes in twenty lines, on the same model and data as cltune trains: the same
base with the same added tokens, LoRA with the same rank, alpha, dropout and target modules (read
from the cltune session's own adapter), the same utterances and lengths, `batch_size` utterances per
optimizer step drawn in a seeded random order and padded to the longest of the batch, one forward and
backward per step through the model's own loss (full-vocabulary logits), AdamW. In bf16 the frozen
base is stored in bf16 and the matmuls run under bf16 autocast, the LoRA weights stay fp32: the
"bf16 frozen base" a careful user would set up. It lacks what cltune adds: length grouping, micro-batch
sizing, the LM head at target positions only, packing, trainable token rows.

`bench/throughput.py` runs it side by side with cltune's loop (`--anchor`); alone:

    .venv/bin/python bench/anchor.py --steps 3 --precision bf16
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path


def anchor_model(stream, precision: str, device: str):
    """The base with the session's added tokens and a plain PEFT LoRA of the session's shape."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cltune.modeling.model import add_special_tokens, load_base, resize_for

    model, tokenizer = load_base(stream.config.model)
    add_special_tokens(tokenizer, stream.speaker_tokens)
    resize_for(model, tokenizer)
    shape = next(iter(stream.ctx.model.peft_config.values()))  # what cltune attached: rank, alpha, targets
    lora = LoraConfig(r=shape.r, lora_alpha=shape.lora_alpha, lora_dropout=shape.lora_dropout,
                      target_modules=sorted(shape.target_modules), task_type="CAUSAL_LM")
    if precision == "bf16":
        model = model.to(torch.bfloat16)  # the frozen base in bf16; PEFT creates the LoRA factors in fp32 below
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model.to(device), tokenizer


def anchor_batches(encoded: list[list[int]], batch_size: int, pad_id: int, seed: int = 0):
    """Seeded random batches of `batch_size` utterances, each padded to its longest: (ids, mask, labels, targets)."""
    import torch

    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    batches = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = [encoded[i] for i in order[start : start + batch_size]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        labels = ids.masked_fill(mask == 0, -100)
        batches.append((ids, mask, labels, sum(len(r) - 1 for r in rows)))
    return batches


def run_anchor(model, batches, steps: int, precision: str, device: str, lr: float = 2e-4):
    """`steps` optimizer steps of the plain loop, timed like cltune's (from the optimizer's creation to the
    end of each step); returns benchlib.Timed."""
    import torch

    from benchlib import load1, window

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    points, tokens = [(time.perf_counter(), 0)], 0
    for ids, mask, labels, targets in (batches[i % len(batches)] for i in range(steps)):
        with autocast:
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        tokens += targets
        points.append((time.perf_counter(), tokens))
    return window(points, load1())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args(argv)
    import torch

    from cltune.modeling.batching import encode

    from benchlib import demo_stream, describe_machine, machine_line

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(machine_line(describe_machine()), flush=True)
    stream = demo_stream(precision=args.precision)
    model, tokenizer = anchor_model(stream, args.precision, device)
    encoded = encode(stream.tasks[0].train, tokenizer, stream.config.data.max_length)
    batches = anchor_batches(encoded, args.batch_size, tokenizer.pad_token_id)
    run_anchor(model, batches, 1, args.precision, device)  # warm-up
    timed = run_anchor(model, batches[1:], args.steps, args.precision, device)
    print(f"anchor {args.precision} batch {args.batch_size}: {timed.tokens_per_s:.1f} tok/s, "
          f"{timed.step_s:.2f} s/step (load {timed.load1})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
