"""`reptile`: first-order meta-learning of the adapter's starting point (Nichol et al. 2018).

Before phase 1 the trainable weights θ (LoRA and the new token rows) are meta-trained on
episodes drawn from phase 1's training split: per meta-iteration, `inner_steps` optimizer steps
on one episode give θ', then θ ← θ + ε(θ' − θ), with ε annealed linearly from `meta_lr` towards
0. The aim is a start from which a few steps fit any one speaker, so later datasets are learned
with smaller moves. Phase 1 then trains as usual from the meta-learned θ, so phase 1 is not
`naive`'s and may not be reused from a naive run.

Cost (phase 1's `before_task` costs): meta_iterations × inner_steps extra forward/backward passes on
`episode_size` utterances each — with the defaults 100 passes on 16 utterances, 1,600
utterance-passes, about the work of one epoch over 1,600 training utterances.
"""

from __future__ import annotations

import random
import time
from typing import Literal

import torch
from accelerate.utils import broadcast
from pydantic import Field

from cltune.config import Strict
from cltune.data.split import Example, TaskData, require_no_test
from cltune.errors import DivergedError
from cltune.modeling.batching import collate
from cltune.modeling.scoring import target_nll
from cltune.strategies.base import Context, Costs, Strategy
from cltune.strategies.shared import Tensors


class ReptileSettings(Strict):
    meta_iterations: int = Field(
        20, ge=0, description="Reptile meta-iterations (episodes) before phase 1; 0 turns it off")
    inner_steps: int = Field(5, ge=1, description="optimizer steps on each episode")
    inner_lr: float = Field(1e-3, gt=0, description="learning rate of the inner steps")
    inner_optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="inner optimizer (adam with β1 = 0, as in the paper)")
    episode_size: int = Field(16, ge=1, description="utterances per episode, all used in every inner step")
    episode: Literal["speaker", "random"] = Field("speaker", description="one speaker's utterances, or a random slice")
    meta_lr: float = Field(
        0.1, gt=0, le=1, description="meta step size ε at the first iteration, annealed linearly to 0")


def meta_step_size(iteration: int, total: int, meta_lr: float) -> float:
    """ε at 0-based `iteration` of `total`: meta_lr · (1 − iteration / total), the paper's linear anneal."""
    return meta_lr * (1 - iteration / total)


def reptile_interpolate(theta: Tensors, adapted: Tensors, epsilon: float) -> Tensors:
    """θ + ε(θ' − θ), parameter by parameter: ε = 1 takes θ', ε = 0 keeps θ."""
    return {name: t + epsilon * (adapted[name] - t) for name, t in theta.items()}


def sample_episode(train: list[Example], size: int, mode: str, rng: random.Random) -> list[Example]:
    """`size` utterances (fewer if there are not enough): of one speaker chosen uniformly, or any."""
    if mode == "speaker":
        speaker = rng.choice(sorted({e.speaker for e in train}))
        train = [e for e in train if e.speaker == speaker]
    return rng.sample(train, min(size, len(train)))


def adapt(ctx: Context, episode: list[Example], steps: int, lr: float, optimizer: str) -> int:
    """The inner loop: `steps` optimizer steps on the whole episode from the current weights.

    Leaves the adapted θ' in the model; returns the target tokens processed. The optimizer is
    fresh per episode, so one episode's moments never steer the next (θ' depends only on θ).
    """
    params = ctx.trainable()
    episode = require_no_test(episode, "Reptile meta-training")
    encoded = ctx.encode(episode)
    batch = collate(encoded, list(range(len(encoded))), ctx.tokenizer.pad_token_id)
    inputs = {k: v.to(ctx.accelerator.device) for k, v in batch.model_inputs().items()}
    if optimizer == "adam":  # β1 = 0: a short inner loop has no history worth averaging (Nichol et al.)
        opt = torch.optim.Adam(params.values(), lr=lr, betas=(0.0, 0.999))
    else:
        opt = torch.optim.SGD(params.values(), lr=lr)
    was_training = ctx.scorer.training
    ctx.scorer.train()
    try:
        for step in range(steps):
            with ctx.accelerator.autocast():
                loss = target_nll(ctx.scorer(**inputs), inputs["labels"]).mean()
            if not torch.isfinite(loss):
                raise DivergedError(f"Reptile inner step {step + 1}: loss is {loss.item()}; lower reptile.inner_lr")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        ctx.scorer.train(was_training)
    return batch.n_targets * steps


class Reptile(Strategy):
    name = "reptile"
    summary = ("Reptile meta-learning of the LoRA start point on phase-1 episodes (20 × 5 steps), "
               "then sequential fine-tuning")
    sections = {"reptile": ReptileSettings}

    def __init__(self, ctx, settings):
        super().__init__(ctx, settings)
        self.cfg: ReptileSettings = settings["reptile"]

    def episodes(self, task: TaskData) -> list[list[Example]]:
        """Every episode of the meta-training, drawn up front from one seeded generator."""
        train = require_no_test(task.train, "Reptile meta-training")
        rng = random.Random(f"{self.ctx.seed}|reptile|{task.index}")
        return [sample_episode(train, self.cfg.episode_size, self.cfg.episode, rng)
                for _ in range(self.cfg.meta_iterations)]

    def before_task(self, task: TaskData, *, resumed: bool = False) -> Costs | None:
        # Resuming phase 1 from a step checkpoint: its weights started from the meta-trained θ and are
        # restored, and the pipeline carries the meta-training's cost over from the checkpoint.
        if task.index == 0 and self.cfg.meta_iterations > 0 and not resumed:
            return self.meta_train(task)
        return None

    def meta_train(self, task: TaskData) -> Costs:
        cfg, params = self.cfg, self.ctx.trainable()
        start, tokens = time.perf_counter(), 0
        for i, episode in enumerate(self.episodes(task)):
            theta = {n: p.detach().clone() for n, p in params.items()}
            try:
                tokens += adapt(self.ctx, episode, cfg.inner_steps, cfg.inner_lr, cfg.inner_optimizer)
            except DivergedError:
                self._assign(theta)  # keep the last good meta-weights, as a diverged phase does
                raise
            adapted = {n: p.detach() for n, p in params.items()}
            self._assign(reptile_interpolate(theta, adapted, meta_step_size(i, cfg.meta_iterations, cfg.meta_lr)))
        if self.ctx.accelerator.num_processes > 1:
            # Every process ran the same seeded episodes; the main process's weights settle any
            # drift from nondeterministic kernels, so all start phase 1 from one θ.
            self._assign(broadcast({n: p.detach() for n, p in params.items()}))
        return {
            "meta_wall_s": round(time.perf_counter() - start, 2), "meta_target_tokens": tokens,
            "meta_iterations": cfg.meta_iterations, "inner_steps": cfg.meta_iterations * cfg.inner_steps,
        }

    def _assign(self, values: Tensors) -> None:
        params = self.ctx.trainable()
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)

    # No state(): the meta-learned start lives in the adapter weights the checkpoint already saves.


STRATEGY = Reptile
