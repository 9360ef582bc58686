"""The selector contract and uniform sampling.

A selector is a frozen dataclass of hyperparameters; what it remembers across rounds (stale losses,
gradient rows) is in the explicit state it threads through ``init`` -> ``select`` -> ``update``,
which the checkpoint keeps. Selectors only ever see the clients that are eligible and available in
the round, so an unavailable client cannot be picked. Before choosing, a selector may ``probe``
candidates: ask them the loss or the gradient of the model they would receive (that costs a
download and a small upload, which the loop counts)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedhet.core import rng
from fedhet.core.messages import ClientInfo
from fedhet.core.types import Metrics

#: ``probe(client ids, what, batch)``: each answering client's ``loss`` (0-d) or ``grad`` (1-D) at
#: the model it would receive this round (on ``batch`` examples, or all its training data); clients
#: whose probe failed are left out of the answer
Probe = Callable[[Sequence[int], str, "int | None"], dict[int, torch.Tensor]]


class ClientSelector(ABC):
    """Frozen dataclass of hyperparameters; the state it threads through rounds is explicit."""

    def init(self, clients: Sequence[ClientInfo]) -> Any:
        return None

    @abstractmethod
    def select(
        self, state: Any, rnd: int, eligible: Sequence[ClientInfo], seed: int, probe: Probe | None = None
    ) -> tuple[list[int], Any]:
        """The clients of round ``rnd`` (sorted ids, from ``eligible`` only) and the new state."""

    def update(self, state: Any, rnd: int, metrics: Mapping[int, Metrics]) -> Any:
        return state


@dataclass(frozen=True)
class Uniform(ClientSelector):
    """Uniform sampling: clients_per_round of the eligible clients (or a fraction of them, rounded
    up), drawn without replacement.

    The draw comes from the generator keyed by (seed, "select", round).
    """

    clients_per_round: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("selection: give clients_per_round or fraction, not both")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ValueError(f"selection.clients_per_round: got {self.clients_per_round!r}, allowed: an integer >= 1")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"selection.fraction: got {self.fraction!r}, allowed: 0 < fraction <= 1")

    def count(self, n: int) -> int:
        if self.clients_per_round is not None:
            return min(self.clients_per_round, n)
        return min(n, max(1, math.ceil((self.fraction if self.fraction is not None else 1.0) * n - 1e-9)))

    def select(
        self, state: Any, rnd: int, eligible: Sequence[ClientInfo], seed: int, probe: Probe | None = None
    ) -> tuple[list[int], Any]:
        ids = sorted(c.id for c in eligible)
        k = self.count(len(ids))
        if k >= len(ids):
            return ids, state
        perm = torch.randperm(len(ids), generator=rng.generator(seed, "select", rnd))[:k]
        return sorted(ids[i] for i in perm.tolist()), state
