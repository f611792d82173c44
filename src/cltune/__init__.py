"""cltune: continual LoRA fine-tuning of causal LMs on a sequence of dialogue styles."""

import os

# oneDNN (bf16 matmuls on CPUs with AMX/AVX-512 BF16) caches a compiled kernel per matmul shape, 1,024 by
# default; variable-length batches keep adding shapes, and on the demo the cache alone grew the process by
# ~0.8 GB over phase 1. 64 entries cost no measurable speed (docs/benchmarks/performance.md). Read when
# torch first runs a oneDNN op, so set before anything here imports torch; a value the user set wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

__version__ = "0.1.0"
