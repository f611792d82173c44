"""Training memory of a 1B-parameter Llama with and without `model.gradient_checkpointing`.

A config-built Llama of TinyLlama-1.1B's shape (22 layers, width 2048, MLP 5632, 32 heads, 4 KV
heads, vocabulary 32,000; random weights, nothing downloaded) goes through cltune's own path: LoRA r16
on q/k/v/o (`attach_lora`), the frozen base in the run's precision (`settle_dtypes`), `TokenScorer`, then
one training micro-batch of `--batch` rows × `--length` tokens, forward and backward. Each case runs in
its own process (the allocator keeps what one case freed), and the process's peak RSS is reset after the
model is built, so the figure is the micro-batch's own: activations, gradients, the checkpointed recompute.

    .venv/bin/python bench/big_model_memory.py                 # both cases, one process each, a table
    .venv/bin/python bench/big_model_memory.py --case on       # one case (what the table runs)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def one_case(checkpointed: bool, batch: int, length: int, precision: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cltune.config import LoraSettings
    from cltune.modeling.model import attach_lora, checkpoint_layers, settle_dtypes
    from cltune.modeling.scoring import TokenScorer, target_nll

    from benchlib import reset_peak, status_mb

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32_000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    low = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.device("cpu"):
        base = LlamaForCausalLM(config).to(low)
    params = sum(p.numel() for p in base.parameters())
    model = attach_lora(base, LoraSettings(r=16, alpha=32, dropout=0.05, train_new_tokens=False), [])
    if checkpointed:
        checkpoint_layers(model)
    settle_dtypes(model, low)
    scorer = TokenScorer(model, low if precision == "bf16" else None)
    scorer.train()
    ids = torch.randint(0, config.vocab_size, (batch, length))
    positions = torch.arange(length).expand(batch, length)
    built = status_mb()
    reset_peak()
    start = time.perf_counter()
    target_nll(scorer(input_ids=ids, position_ids=positions, labels=ids), ids).mean().backward()
    seconds = time.perf_counter() - start
    peak = status_mb()["VmHWM"]
    return {"gradient_checkpointing": checkpointed, "parameters": params, "batch": batch, "length": length,
            "precision": precision, "model_rss_mb": built["VmRSS"], "peak_rss_mb": peak,
            "step_mb": peak - built["VmRSS"], "step_s": round(seconds, 1), "torch": torch.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=["on", "off"], default=None, help="run one case in this process")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(one_case(args.case == "on", args.batch, args.length, args.precision)), flush=True)
        return 0
    from benchlib import describe_machine, machine_line, table

    print(machine_line(describe_machine()), flush=True)
    rows = []
    for case in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--case", case, "--batch", str(args.batch), "--length",
                              str(args.length), "--precision", args.precision], capture_output=True, text=True,
                             check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    off, on = rows
    print()
    print(table(["gradient_checkpointing", "model built (MB)", "peak in the step (MB)", "the step's own (MB)",
                 "step (s)"],
                [[str(r["gradient_checkpointing"]).lower(), r["model_rss_mb"], r["peak_rss_mb"], r["step_mb"],
                  r["step_s"]] for r in rows]))
    print(f"\n{off['parameters'] / 1e9:.2f}B parameters, {args.precision} base, micro-batch {args.batch} × "
          f"{args.length}: checkpointing takes the step's memory from {off['step_mb']} to {on['step_mb']} MB "
          f"({on['step_mb'] / off['step_mb']:.2f}×) for {on['step_s'] / off['step_s']:.2f}× its time")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
