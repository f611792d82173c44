"""`joint`: phase k trains on every dataset seen so far at once — the upper bound of the stream."""

from cltune.data.split import Example, TaskData
from cltune.strategies.base import Strategy


class Joint(Strategy):
    name = "joint"
    summary = "phase k trains on the union of datasets 1..k (cumulative joint training, the upper bound)"
    phase1_neutral = True

    def train_data(self, task: TaskData) -> list[Example]:
        return [e for t in self.ctx.tasks[: task.index + 1] for e in t.train]


STRATEGY = Joint
