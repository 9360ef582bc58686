"""In-memory datasets: every split is a pair of tensors, batched by index (no DataLoader workers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fedhet.data.tasks import CLASSIFICATION, Task

#: A batch transform applied during training only, e.g. random crop + flip: (x, generator) -> x.
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class ArrayDataset:
    """Features and targets as tensors with the same first dimension, and the task they pose (which
    loss trains on them and which metrics score them; image and tabular data are classification)."""

    x: torch.Tensor
    y: torch.Tensor
    task: Task = CLASSIFICATION

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"ArrayDataset: x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(self.x[index], self.y[index], self.task)

    def batches(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        order: torch.Tensor | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches in a random order drawn from ``generator``, or in ``order`` (a permutation
        of the examples' indices), or in sequential order when neither is given."""
        n = len(self)
        if order is not None:
            if generator is not None:
                raise ValueError("batches: give a generator or an order, not both")
            if order.shape != (n,):
                raise ValueError(f"batches: order has shape {tuple(order.shape)}; allowed: ({n},), a permutation of the {n} examples")
        elif generator is not None:
            order = torch.randperm(n, generator=generator)
        stop = n - (n % batch_size) if drop_last else n
        for start in range(0, stop, batch_size):
            if order is None:
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                yield self.x[idx], self.y[idx]
