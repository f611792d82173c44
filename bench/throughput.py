"""Training throughput of cltune's loop against the seed's stack, and the machine's matmul ceiling.

Both sides train the same bundled model (SmolLM2-135M-Instruct + LoRA r16, α32, dropout .05 on
q,k,v,o) on the same utterances (guest A's train split of configs/demo.yaml) on this machine:

- baseline, written the way the seed did it: HF `Trainer` + PEFT, every utterance padded to
  max_length=100, batch 2 × gradient accumulation 16, fp32, full-vocabulary logits;
- cltune: the real `cltune.train.train_phase` (Naive strategy, the Context built as
  `cltune.pipeline.run` builds it), its defaults (length-grouped micro-batches of 8, LM head only
  at target positions, precision auto = fp32 on a CPU without bf16 hardware).

Runs alternate (A B, then B A, …) after a warm-up run of each, so load from other jobs hits both
sides alike. Throughput counts real target tokens (every non-pad token of an utterance but its
speaker token) per second, from the start of each run's loop (optimizer built) to the end of its
last optimizer step; the baseline's clock is a Trainer callback, cltune's is its own train log.

FLOP count: a frozen base with LoRA costs ≈ 4·N FLOP per target token (forward 2N, backward
through the activations 2N; no weight gradients for the frozen base), N = base parameters with the
tied embedding counted once (as the LM head). LoRA's own FLOPs and attention are ignored.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/throughput.py   # 3 rounds (~8 min on 2 busy cores)
    .venv/bin/python bench/throughput.py --steps 2 --rounds 1 --json out.json
    .venv/bin/python bench/throughput.py --device cuda --micro-batch-size 128 --batch-size 256 --packing
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="cltune optimizer steps per run")
    p.add_argument("--baseline-steps", type=int, default=1,
                   help="baseline optimizer steps per run (each is 32 utterances padded to 100: ~1 min on 2 cores)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved baseline/cltune rounds after the warm-up")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--model", default=None, help="model.name for both sides (default: the config's bundled model), e.g. a "
                                                   "folder with SmolLM2's config and random weights on a GPU machine")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="cltune micro-batch (default: the config's)")
    p.add_argument("--batch-size", type=int, default=None, help="cltune utterances per optimizer step (default: the config's)")
    p.add_argument("--packing", action="store_true", help="cltune: pack utterances into rows of --pack-length")
    p.add_argument("--pack-length", type=int, default=256)
    p.add_argument("--skip-baseline", action="store_true", help="time cltune only (e.g. on a GPU, to size batches)")
    p.add_argument("--peak-seconds", type=float, default=2.0, help="time spent on the fp32 matmul peak per round")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    return p.parse_args(argv)


def matmul_peak(torch, dtype, device: str, n: int, budget_s: float) -> float:
    """Best FLOP/s of an n×n×n matmul on all threads, repeated for about `budget_s` seconds."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < budget_s or best == float("inf"):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class TokenCounter:
    """Counts the target tokens the baseline model actually trains on (a forward pre-hook)."""

    def __init__(self):
        self.tokens = 0

    def __call__(self, module, args, kwargs):
        labels = kwargs.get("labels")
        if labels is not None and module.training:
            self.tokens += int((labels[:, 1:] != -100).sum())


def baseline_model(stream, device: str):
    """The seed's model: same base, same added tokens, plain PEFT LoRA (no trainable token rows)."""
    from peft import LoraConfig, get_peft_model

    from cltune.model import add_special_tokens, load_base, resize_for

    model, tokenizer = load_base(stream.config.model)
    add_special_tokens(tokenizer, stream.speaker_tokens)
    resize_for(model, tokenizer)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora).to(device), tokenizer


def padded_dataset(torch, encoded: list[list[int]], pad_id: int, max_length: int = 100):
    """Every utterance padded to max_length, labels -100 at pads (the seed's collator does the same)."""
    rows = []
    for seq in encoded:
        pad = max_length - len(seq)
        rows.append({"input_ids": torch.tensor(seq + [pad_id] * pad), "attention_mask": torch.tensor([1] * len(seq) + [0] * pad),
                     "labels": torch.tensor(seq + [-100] * pad)})
    return rows


def run_baseline(model, dataset, steps: int, device: str, counter: TokenCounter):
    """One HF Trainer run of `steps` optimizer steps, timed at the end of each step."""
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from benchlib import load1, window

    points = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # after the optimizer is built, as in train_phase
            points.append((time.perf_counter(), counter.tokens))

        def on_step_end(self, args, state, control, **kwargs):
            points.append((time.perf_counter(), counter.tokens))

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=2, gradient_accumulation_steps=16, max_steps=steps,
            learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=round(0.1 * steps), logging_strategy="no", save_strategy="no",
            report_to="none", use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                callbacks=[StepClock()]).train()
    return window(points, load1())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from benchlib import demo_stream, describe_machine, machine_line, median, phase_settings, run_cltune, table, \
        with_small_val, write_json
    from cltune.batching import encode
    from cltune.session import mixed_precision
    from cltune.strategies import create_strategy

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = describe_machine()
    print(machine_line(machine), flush=True)

    stream = demo_stream(overrides=[f"model.name={args.model}"] if args.model else None)
    config, ctx = stream.config, stream.ctx
    task = with_small_val(stream.tasks[0])
    strategy = create_strategy("naive", ctx, config)
    changes = {k: v for k, v in {"micro_batch_size": args.micro_batch_size, "batch_size": args.batch_size}.items() if v}
    changes.update(packing=args.packing, pack_length=args.pack_length)
    settings = lambda steps: phase_settings(config, steps, **changes)  # noqa: E731

    if not args.skip_baseline:
        model, tokenizer = baseline_model(stream, device)
        counter = TokenCounter()
        model.register_forward_pre_hook(counter, with_kwargs=True)
        dataset = padded_dataset(torch, encode(task.train, tokenizer, config.data.max_length), tokenizer.pad_token_id)

    # bf16 matmuls without bf16 hardware take minutes at 2048³: a 512³ one (or 2048³ on a GPU) says enough.
    bf16_n = 2048 if device == "cuda" else 512
    peaks = {"bf16_flops": matmul_peak(torch, torch.bfloat16, device, bf16_n, 0.5), "bf16_n": bf16_n, "fp32": []}
    print("warm-up …", flush=True)
    run_cltune(stream, strategy, task, settings(1))
    if not args.skip_baseline:
        run_baseline(model, dataset, 1, device, counter)

    rounds = []
    for r in range(args.rounds):
        order = ["baseline", "cltune"] if r % 2 == 0 else ["cltune", "baseline"]
        got = {}
        for side in order:
            if side == "baseline" and args.skip_baseline:
                continue
            got[side] = (run_baseline(model, dataset, args.baseline_steps, device, counter) if side == "baseline"
                         else run_cltune(stream, strategy, task, settings(args.steps)))
        peaks["fp32"].append(matmul_peak(torch, torch.float32, device, 2048, args.peak_seconds))
        rounds.append(got)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v.tokens_per_s:.1f} tok/s (load {v.load1})" for k, v in got.items()),
              flush=True)

    n_params = stream.base_params
    cl = [r["cltune"].tokens_per_s for r in rounds]
    rows = []
    for i, r in enumerate(rounds):
        base = r.get("baseline")
        rows.append([i + 1, f"{base.tokens_per_s:.1f}" if base else "-", f"{r['cltune'].tokens_per_s:.1f}",
                     f"{r['cltune'].tokens_per_s / base.tokens_per_s:.2f}×" if base else "-",
                     f"{peaks['fp32'][i] / 1e9:.1f}", f"{r['cltune'].load1} / {base.load1 if base else '-'}"])
    summary = {"cltune_tokens_per_s": median(cl), "fp32_peak_flops_median": median(peaks["fp32"]),
               "fp32_peak_flops_best": max(peaks["fp32"]), "bf16_peak_flops": peaks["bf16_flops"], "base_params": n_params}
    if not args.skip_baseline:
        bl = [r["baseline"].tokens_per_s for r in rounds]
        summary.update(baseline_tokens_per_s=median(bl), ratio=median(c / b for c, b in zip(cl, bl)),
                       baseline_step_s=median(r["baseline"].step_s for r in rounds))
        rows.append(["median", f"{median(bl):.1f}", f"{median(cl):.1f}", f"{summary['ratio']:.2f}×",
                     f"{summary['fp32_peak_flops_median'] / 1e9:.1f}", ""])
    summary["cltune_step_s"] = median(r["cltune"].step_s for r in rounds)
    print()
    print(table(["round", "baseline tok/s", "cltune tok/s", "ratio", "fp32 peak GFLOP/s", "load1 cl / bl"], rows))

    achieved = 4 * n_params * summary["cltune_tokens_per_s"]
    summary.update(cltune_flops=achieved, share_of_fp32_peak_median=achieved / summary["fp32_peak_flops_median"],
                   share_of_fp32_peak_best=achieved / summary["fp32_peak_flops_best"])
    print(f"\nmatmul peak ({device}, {torch.get_num_threads()} threads): fp32 2048³ {summary['fp32_peak_flops_best'] / 1e9:.1f} "
          f"GFLOP/s best, {summary['fp32_peak_flops_median'] / 1e9:.1f} median; bf16 {bf16_n}³ {peaks['bf16_flops'] / 1e9:.2f} GFLOP/s")
    precision = {"no": "fp32"}.get(mixed_precision(config.model.precision), mixed_precision(config.model.precision))
    print(f"cltune ({precision}): 4·N·tok/s = 4 × {n_params / 1e6:.1f}M × "
          f"{summary['cltune_tokens_per_s']:.1f} = {achieved / 1e9:.1f} GFLOP/s = {100 * summary['share_of_fp32_peak_median']:.0f}% "
          f"of the median fp32 peak ({100 * summary['share_of_fp32_peak_best']:.0f}% of the best)")
    if not args.skip_baseline:
        useful = 4 * n_params * summary["baseline_tokens_per_s"]
        executed = 4 * n_params * 32 * 100 / summary["baseline_step_s"]  # every padded position is computed
        summary.update(baseline_useful_flops=useful, baseline_executed_flops=executed)
        print(f"baseline: useful {useful / 1e9:.1f} GFLOP/s ({100 * useful / summary['fp32_peak_flops_median']:.0f}% of peak); "
              f"executed on pads too ≈ {executed / 1e9:.1f} GFLOP/s")
    write_json(args.json, {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine,
                           "settings": {**vars(args), "cltune_phase": settings(args.steps).model_dump()},
                           "rounds": [{k: vars(v) for k, v in r.items()} for r in rounds], "peaks": peaks, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
