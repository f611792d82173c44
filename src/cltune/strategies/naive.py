"""`naive`: plain sequential fine-tuning, the baseline that shows how much is forgotten."""

from cltune.strategies.base import Strategy


class Naive(Strategy):
    name = "naive"
    summary = "plain sequential fine-tuning on each dataset in turn (the forgetting baseline)"
    phase1_neutral = True


STRATEGY = Naive
