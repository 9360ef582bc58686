"""The accumulator protocol that every aggregation rule implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from typing import TYPE_CHECKING

from fedhet.core.messages import ClientResult, ClientTask

if TYPE_CHECKING:
    from fedhet.aggregation.robust import ClientUpdate, RobustRule


class Accumulator(ABC):
    """Folds client results into an aggregate.

    Executors fold a round's clients in one canonical tree (``fedhet.simulation.reduce``), so the
    grouping never depends on placement. The one rule an accumulator must keep: adding a client to
    it gives the same bits as merging into it an ``empty()`` accumulator to which only that client
    was added (true of sums whose per-client term is computed exactly, as a float32 value times an
    integer weight is in float64, and of collections)."""

    @abstractmethod
    def add(self, cid: int, task: ClientTask, result: ClientResult) -> None: ...

    @abstractmethod
    def merge(self, other: Accumulator) -> None: ...

    def empty(self) -> Accumulator:
        """A fresh accumulator of the same kind and settings (what a worker starts from)."""
        return type(self)()

    def absorb(self, other: Accumulator) -> None:
        """``merge(other)`` where ``other`` is not used afterwards, so its tensors may be taken
        over rather than copied (default: ``merge``)."""
        self.merge(other)

    # -- robust aggregation (``fedhet.aggregation.robust``) ----------------------------------------
    def use_rule(self, rule: RobustRule) -> bool:
        """Combine the round's updates with ``rule`` instead of a plain mean (set before any client
        is added; ``empty()`` keeps it). False where this accumulator does not support robust rules."""
        return False

    def kept_updates(self) -> dict[int, ClientUpdate]:
        """The updates kept under a robust rule, by client id (none without one)."""
        return {}

    def reject(self, cids: Collection[int]) -> None:
        """Leave these clients' updates out of the round (a robust rule's screen rejected them)."""


class KeepsUpdates(Accumulator):
    """An accumulator that keeps each client's update (``kept``) when a robust rule is active and
    combines them with ``rule`` at the end (its ``reject`` drops updates from its own sums too)."""

    rule: RobustRule | None
    kept: dict[int, ClientUpdate]

    def use_rule(self, rule: RobustRule) -> bool:
        self.rule = rule if rule.active else None
        return True

    def kept_updates(self) -> dict[int, ClientUpdate]:
        return self.kept


class Collect(Accumulator):
    """Keeps every result; for rules that need all of them at once (median, clustering, ...)."""

    def __init__(self) -> None:
        self.results: dict[int, ClientResult] = {}
        self.tasks: dict[int, ClientTask] = {}

    def add(self, cid: int, task: ClientTask, result: ClientResult) -> None:
        self.results[cid] = result
        self.tasks[cid] = task

    def merge(self, other: Accumulator) -> None:
        assert isinstance(other, Collect)
        self.results.update(other.results)
        self.tasks.update(other.tasks)

    def ordered(self) -> list[tuple[int, ClientResult]]:
        return sorted(self.results.items())
