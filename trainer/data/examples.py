"""Labelled examples of a task as micro-batches: the data of the classifier families.

``ExampleBatches`` draws examples by the same schedule as language-model windows
(``trainer/data/sampler.py``'s ``BatchSchedule``: a pure function of seed and step, shuffled per
epoch), so every layout with the same global batch trains on the same examples per step and
resume needs only the step number. ``collate`` turns example indices into the family's batch
(trees as node tensors, sequences as padded ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from trainer.data.sampler import BatchSchedule

Collate = Callable[[Sequence[int]], dict[str, Any]]


class ExampleBatches:
    """Micro-batches of examples ``0 .. n-1``: shuffled for training, in order for evaluation."""

    def __init__(self, n: int, collate: Collate, micro: int, accum: int, dp: int, seed: int) -> None:
        self.n, self.collate, self.micro = n, collate, micro
        self.schedule = BatchSchedule(n, micro, accum, dp, seed)

    def __len__(self) -> int:
        return self.n

    def micro_batch(self, step: int, micro: int, rank: int) -> dict[str, Any]:
        return self.collate(self.schedule.micro_batch(step, micro, rank).tolist())

    @property
    def eval_capacity(self) -> int:
        """Evaluation batches before an example would be read a second time."""
        return self.n // self.micro

    def eval_batches(self, rank: int, dp: int, n: int) -> Iterator[dict[str, Any]]:
        for b in range(n):
            first = (b * dp + rank) * self.micro
            yield self.collate((np.arange(first, first + self.micro) % self.n).tolist())

    def epoch_of(self, step: int) -> float:
        return self.schedule.epoch_of(step)
