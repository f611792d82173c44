"""The cost per training token of the routed strategies' mixes as columns accumulate, against one adapter (what
naive trains).

On the podcast config (the demo host and six guests, the bundled SmolLM2-135M, the run's precision), the
progressive strategy adds its columns one by one; after each, the same micro-batches of that column's task go
through a training step (forward, backward) three ways, interleaved round by round:

- `one adapter`: the column's own adapter alone (no laterals): naive's work per token;
- `progressive`: the column with its laterals as `progressive` computes them (`AdapterMix`: its own adapter and
  every earlier one, weighted per output channel by the gains, as one low-rank product);
- `per token`: every adapter so far weighted per token by a linear gate on each layer's input, as `fusion` mixes
  them (the same `AdapterMix`, the gate's arithmetic included).

Prints seconds per step (median over rounds) and the ratios to `one adapter`, measured side by side.

    .venv/bin/python bench/laterals.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--utterances", type=int, default=32, help="utterances per timed step")
    args = parser.parse_args()

    import torch
    import yaml

    from cltune.api import make_config
    from cltune.data.demo import write_demo_corpus
    from cltune.modeling.batching import collate
    from cltune.modeling.scoring import target_nll
    from cltune.strategies.adapters import adapter_name
    from cltune.strategies.mixing import AdapterMix, lora_layers
    from cltune.training.session import build_session

    folder = Path(tempfile.mkdtemp(prefix="bench-laterals-"))
    write_demo_corpus(folder, guests=6)
    raw = yaml.safe_load((ROOT / "src/cltune/configs/podcast.yaml").read_text(encoding="utf-8"))
    for task in raw["tasks"]:
        task["path"] = str(folder / Path(task["path"]).name)
    raw["output_dir"] = str(folder / "runs")
    session = build_session(make_config(raw))
    ctx, strategy, model = session.ctx, session.strategy, session.model
    scorer = ctx.scorer.train()
    print(f"{type(strategy).__name__}, precision {ctx.base_dtype}, {torch.get_num_threads()} threads")

    gate = [torch.nn.Linear(layer.in_features, len(ctx.tasks)) for layer in lora_layers(model)]

    def per_token(k: int) -> AdapterMix:
        def scales(index, x):
            weights = gate[index](x.detach().float())[..., : k + 1].softmax(-1)
            return [weights[..., i : i + 1] for i in range(k + 1)]
        return AdapterMix(model, [adapter_name(i) for i in range(k + 1)], scales)

    def step(batch) -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        strategy.laterals.zero_grad(set_to_none=True)
        target_nll(scorer(**batch.model_inputs()), batch.labels).mean().backward()
        return time.perf_counter() - start

    print("| columns | one adapter s | progressive s | per token s | progressive / one | per token / one |")
    print("|---|---|---|---|---|---|")
    for k, task in enumerate(ctx.tasks):
        strategy.before_task(task)
        encoded = ctx.encode(task.train[: args.utterances])
        batch = collate(encoded, list(range(len(encoded))), ctx.tokenizer.pad_token_id)
        ways = {"one": lambda k=k: strategy.columns.use(None) or model.set_adapter(adapter_name(k)),
                "progressive": lambda k=k: strategy.columns.use(k),
                "per token": lambda k=k: strategy.columns.use(None) or per_token(k)}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, install in ways.items():
                mix = install()
                times[name].append(step(batch))
                if isinstance(mix, AdapterMix):
                    mix.remove()
        med = {name: statistics.median(t[1:]) for name, t in times.items()}
        print(f"| {k + 1} | {med['one']:.3f} | {med['progressive']:.3f} | {med['per token']:.3f} | "
              f"{med['progressive'] / med['one']:.2f}× | {med['per token'] / med['one']:.2f}× |", flush=True)
        strategy.columns.use(k)
        strategy.after_task(task)


if __name__ == "__main__":
    main()
