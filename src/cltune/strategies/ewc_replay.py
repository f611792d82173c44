"""`ewc_replay`: the reference pipeline's method — replay of earlier utterances plus the EWC penalty, with the
Fisher estimated on the very utterances that are replayed."""

from cltune.strategies.base import Composite
from cltune.strategies.ewc import EWC
from cltune.strategies.replay import Replay


class EWCReplay(Composite):
    name = "ewc_replay"
    summary = ("replay (10% of earlier data) + EWC (λ=10) with the Fisher on the replayed utterances "
               "(the reference pipeline's method)")
    parts = (Replay, EWC)


STRATEGY = EWCReplay
