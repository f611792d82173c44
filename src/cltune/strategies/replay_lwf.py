"""`replay_lwf`: replay of earlier utterances plus Learning-without-Forgetting distillation of the previous
phase's model on every micro-batch (new and replayed utterances alike)."""

from cltune.strategies.base import Composite
from cltune.strategies.lwf import LwF
from cltune.strategies.replay import Replay


class ReplayLwF(Composite):
    name = "replay_lwf"
    summary = "replay (10% of earlier data) + LwF distillation of the previous phase's model (T=2, α=1)"
    parts = (Replay, LwF)


STRATEGY = ReplayLwF
