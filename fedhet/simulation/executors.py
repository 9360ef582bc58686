"""Executors run the clients of a round. The sequential one runs them in this process, one after
another; ``fedhet.simulation.parallel`` runs them in long-lived worker processes. Both give the same
results: client randomness is keyed by (seed, round, client id), and aggregation sums in float64."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from fedhet.aggregation.base import Accumulator
from fedhet.core.algorithm import Algorithm
from fedhet.core.messages import ClientInfo, ClientTask
from fedhet.core.types import Metrics
from fedhet.simulation.store import ClientStore
from fedhet.simulation.world import ClientWorld, run_eval, run_probe, run_train


@dataclass
class RoundOutcome:
    acc: Accumulator
    #: per-client metrics of the clients that succeeded (train loss, steps, ...)
    metrics: dict[int, Metrics] = field(default_factory=dict)
    #: per-client upload size in bytes
    bytes_up: dict[int, int] = field(default_factory=dict)
    #: clients left out of the round, with the reason
    failures: dict[int, str] = field(default_factory=dict)


def fold(outcome: RoundOutcome, cid: int, task: ClientTask, out: Any, store: ClientStore | None) -> None:
    """Add one client's outcome to the round (shared by every executor)."""
    from fedhet.core.types import params_nbytes

    if out.error is not None:
        outcome.failures[cid] = out.error
        return
    outcome.acc.add(cid, task, out.result)
    outcome.metrics[cid] = dict(out.result.metrics)
    dense = params_nbytes(out.result.params) + params_nbytes(out.result.extras)
    outcome.bytes_up[cid] = out.upload_bytes if out.upload_bytes is not None else dense
    if store is not None:
        store.put(cid, out.store)


class Executor(ABC):
    def __init__(self, world: ClientWorld, store: ClientStore) -> None:
        self.world = world
        self.store = store

    @abstractmethod
    def train(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo], acc: Accumulator
    ) -> RoundOutcome: ...

    @abstractmethod
    def evaluate(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo]
    ) -> dict[int, Metrics | str]: ...

    @abstractmethod
    def probe(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo], what: str, batch: int | None = None
    ) -> dict[int, Any]:
        """Each client's answer to a selector's probe (a tensor, or the error message)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SequentialExecutor(Executor):
    """Clients one after another in this process, in client-id order."""

    def train(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo], acc: Accumulator
    ) -> RoundOutcome:
        outcome = RoundOutcome(acc)
        for cid in sorted(tasks):
            out = run_train(algorithm, self.world, infos[cid], tasks[cid], self.store.get(cid))
            fold(outcome, cid, tasks[cid], out, self.store)
        return outcome

    def evaluate(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo]
    ) -> dict[int, Metrics | str]:
        return {cid: run_eval(algorithm, self.world, infos[cid], tasks[cid], self.store.get(cid)) for cid in sorted(tasks)}

    def probe(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo], what: str, batch: int | None = None
    ) -> dict[int, Any]:
        return {cid: run_probe(algorithm, self.world, infos[cid], tasks[cid], self.store.get(cid), what, batch) for cid in sorted(tasks)}
