"""Executors run the clients of a round. The sequential one runs them in this process, one after
another; ``fedhet.simulation.parallel`` runs them in long-lived worker processes on this machine and
``fedhet.simulation.ray_executor`` in Ray actors on one machine or a cluster. All give the same
bits: client randomness is keyed by (seed, round, client id), and every executor folds the clients'
results in the canonical tree of ``fedhet.simulation.reduce``, whatever the number of workers."""

from __future__ import annotations

import bisect
import ctypes
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedhet.aggregation.base import Accumulator
from fedhet.core.algorithm import Algorithm
from fedhet.core.messages import ClientInfo, ClientTask
from fedhet.core.types import Metrics
from fedhet.simulation.reduce import Block, BlockFolder, combine, share_blocks
from fedhet.simulation.store import ClientStore
from fedhet.simulation.world import ClientOutcome, ClientWorld, Job, eval_groups, run_eval_group, run_probe, run_train

#: The executors and what each does, in one sentence (``fedhet list``).
EXECUTORS = {
    "sequential": "Every client of a round in turn in this process (the reference every other executor matches bit for bit).",
    "parallel": "The round's clients in shares over long-lived worker processes on this machine, the same bits as sequential.",
    "ray": "The round's clients in shares over Ray actors, on this machine or a Ray cluster, the same bits as sequential.",
}


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # a C library without it
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing where the C
    library has no such call). A round's partial sums are float64 copies of the model that are freed
    once combined; glibc serves them from its heap after the first few and keeps the freed pages,
    so a process that receives or builds them every round keeps growing by about that much. Called
    once a round by the training loop (after aggregation) and by each parallel worker (after its
    reply): a system call, and the next round faults the pages it touches back in."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass
class RoundOutcome:
    acc: Accumulator
    #: per-client metrics of the clients that succeeded (train loss, steps, ...)
    metrics: dict[int, Metrics] = field(default_factory=dict)
    #: per-client upload size in bytes
    bytes_up: dict[int, int] = field(default_factory=dict)
    #: clients left out of the round, with the reason
    failures: dict[int, str] = field(default_factory=dict)


def fold(outcome: RoundOutcome, acc: Accumulator, cid: int, task: ClientTask, out: Any, store: ClientStore | None) -> None:
    """Add one client's outcome to the round: its result to ``acc``, its metrics, upload size or
    failure to ``outcome``, its new state to ``store`` (shared by every executor)."""
    from fedhet.core.types import params_nbytes

    if out.error is not None:
        outcome.failures[cid] = out.error
        return
    acc.add(cid, task, out.result)
    outcome.metrics[cid] = dict(out.result.metrics)
    dense = params_nbytes(out.result.params) + params_nbytes(out.result.extras)
    outcome.bytes_up[cid] = out.upload_bytes if out.upload_bytes is not None else dense
    if store is not None:
        store.put(cid, out.store)


def train_share(
    algorithm: Algorithm[Any], world: ClientWorld, jobs: Iterable[Job], lo: int, template: Accumulator, store: ClientStore | None
) -> tuple[RoundOutcome, dict[Block, Accumulator]]:
    """Train a contiguous share of the round's clients, the first being leaf ``lo`` of the round's
    canonical tree, back to back; each client's result is a leaf (nothing, when the client fails)
    folded into the share's blocks of the tree. Returns the share's metrics, upload sizes and failures
    (its ``acc`` is unused) and its blocks."""
    outcomes = ((cid, task, run_train(algorithm, world, info, task, entry)) for cid, task, info, entry in jobs)
    return fold_share(outcomes, lo, template, store)


def fold_share(
    outcomes: Iterable[tuple[int, ClientTask, ClientOutcome]], lo: int, template: Accumulator, store: ClientStore | None
) -> tuple[RoundOutcome, dict[Block, Accumulator]]:
    """Fold the outcomes of a contiguous share of the round's clients (in client-id order, the first
    being leaf ``lo`` of the canonical tree) into the share's blocks of the tree; each is consumed as it
    comes, so an executor may compute them one by one (``train_share``) or receive them."""
    outcome = RoundOutcome(template)
    folder = BlockFolder(lo, template)
    for cid, task, out in outcomes:
        folder.push(lambda acc: fold(outcome, acc, cid, task, out, store))  # noqa: B023 (called at once)
    return outcome, folder.blocks()


def fold_round(outcomes: Iterable[tuple[int, ClientTask, ClientOutcome]], n: int, acc: Accumulator, store: ClientStore | None) -> RoundOutcome:
    """A whole round's ``n`` outcomes (client-id order) folded in one place, as the sequential and
    Flower executors do: the canonical tree's blocks combined into ``acc``."""
    part, blocks = fold_share(outcomes, 0, acc, store)
    outcome = RoundOutcome(acc)
    merge_share(outcome, part)
    return finish_round(outcome, blocks, n)


def merge_share(outcome: RoundOutcome, part: RoundOutcome) -> None:
    """Add a share's metrics, upload sizes and failures to the round's."""
    outcome.metrics.update(part.metrics)
    outcome.bytes_up.update(part.bytes_up)
    outcome.failures.update(part.failures)


def finish_round(outcome: RoundOutcome, blocks: Mapping[Block, Accumulator], n: int) -> RoundOutcome:
    """Combine the shares' blocks into the round's accumulator (canonical order) and put the
    per-client dictionaries in client-id order."""
    root = combine(blocks, n)
    if root is not None:
        outcome.acc.absorb(root)
    outcome.metrics = {c: outcome.metrics[c] for c in sorted(outcome.metrics)}
    outcome.bytes_up = {c: outcome.bytes_up[c] for c in sorted(outcome.bytes_up)}
    outcome.failures = {c: outcome.failures[c] for c in sorted(outcome.failures)}
    return outcome


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
        cids = sorted(tasks)
        outcomes = ((cid, tasks[cid], run_train(algorithm, self.world, infos[cid], tasks[cid], self.store.get(cid))) for cid in cids)
        return fold_round(outcomes, len(cids), acc, self.store)

    def evaluate(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo]
    ) -> dict[int, Metrics | str]:
        token = object()  # one evaluation pass: clients sent the same parameters share one load
        out: dict[int, Metrics | str] = {}
        for group in eval_groups(algorithm, self.world, sorted(tasks), tasks, infos):
            out.update(run_eval_group(algorithm, self.world, [(c, tasks[c], infos[c], self.store.get(c)) for c in group], token))
        return out

    def probe(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo], what: str, batch: int | None = None
    ) -> dict[int, Any]:
        return {cid: run_probe(algorithm, self.world, infos[cid], tasks[cid], self.store.get(cid), what, batch) for cid in sorted(tasks)}


# ------------------------------------------------------------------------------ sharded executors


def split_clients(cids: Sequence[int], weights: Sequence[float], parts: int) -> list[list[int]]:
    """Split ``cids`` (in the given order) into ``parts`` contiguous chunks of about equal total
    weight. Chunk ``j`` ends where the running weight is closest to ``(j + 1) / parts`` of the total;
    every chunk is non-empty when there are at least ``parts`` clients (with fewer, one client per
    chunk and the last chunks empty). Deterministic."""
    n = len(cids)
    if len(weights) != n:
        raise ValueError(f"split_clients: {n} clients but {len(weights)} weights")
    if parts < 1:
        raise ValueError(f"split_clients: parts is {parts}; allowed: >= 1")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + max(float(w), 0.0))
    total = prefix[-1]
    if n <= parts:  # one client per chunk, the last chunks empty
        return [[c] for c in cids] + [[] for _ in range(parts - n)]
    bounds = [0]
    for j in range(1, parts):
        lo, hi = bounds[-1] + 1, n - (parts - j)  # this chunk and each later one keep a client
        target = total * j / parts
        # the first boundary whose running weight reaches the target, or the one before it if closer
        i = bisect.bisect_left(prefix, target, lo, hi + 1)
        candidates = [k for k in (i - 1, i) if lo <= k <= hi]
        bounds.append(min(candidates, key=lambda k: (abs(prefix[k] - target), k)))
    bounds.append(n)
    return [list(cids[a:b]) for a, b in zip(bounds, bounds[1:])]


class Recorder(ClientStore):
    """Collects the store entries a worker's clients write, to send them back to the driver's
    store (which is written only once the whole share has succeeded)."""

    def __init__(self) -> None:
        self.saved: dict[int, dict[str, Any]] = {}

    def get(self, cid: int) -> dict[str, Any]:
        raise NotImplementedError("a worker's store entries come with its request")

    def put(self, cid: int, state: dict[str, Any] | None) -> None:
        self.saved[cid] = dict(state or {})

    def clients(self) -> list[int]:
        return sorted(self.saved)

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return dict(self.saved)

    def restore(self, snapshot: dict[int, dict[str, Any]]) -> None:
        self.saved = dict(snapshot)


# A request is a tuple whose first item is its kind and whose last item is its jobs:
#   ("train", algorithm, empty accumulator, first leaf, jobs)
#   ("eval", algorithm, sizes of its eval groups, jobs)
#   ("probe", algorithm, what, batch, jobs)


def handle_request(world: ClientWorld, request: tuple[Any, ...]) -> Any:
    """Run a request in a worker (any process holding ``world``); the reply is what the driver's
    ``ShardedExecutor`` merges."""
    kind = request[0]
    if kind == "train":
        _, algorithm, template, lo, jobs = request
        stores = Recorder()
        part, blocks = train_share(algorithm, world, jobs, lo, template, stores)
        return part, blocks, stores.saved
    if kind == "eval":
        _, algorithm, sizes, jobs = request
        token = object()
        out: dict[int, Any] = {}
        start = 0
        for size in sizes:
            out.update(run_eval_group(algorithm, world, jobs[start : start + size], token))
            start += size
        return out
    if kind == "probe":
        _, algorithm, what, batch, jobs = request
        return {cid: run_probe(algorithm, world, info, task, store, what, batch) for cid, task, info, store in jobs}
    raise ValueError(f"unknown request {kind!r}")


def failed_reply(request: tuple[Any, ...], reason: str) -> Any:
    """The reply of a request whose worker could not run it: every client of the share failed with
    ``reason`` (for training, their leaves of the canonical tree stay empty)."""
    kind, jobs = request[0], request[-1]
    cids = [job[0] for job in jobs]
    errors = {cid: f"round {job[1].round}, client {cid}: {reason}" for cid, job in zip(cids, jobs)}
    if kind == "train":
        template, lo = request[2], request[3]
        part = RoundOutcome(template, failures=errors)
        return part, {block: template.empty() for block in share_blocks(lo, lo + len(jobs))}, {}
    return errors


class ShardedExecutor(Executor):
    """An executor whose workers each run a contiguous share of the round's clients: the shares,
    the requests and the merging of the replies, for any transport. A subclass sends the requests
    and hands back the replies (``_call``)."""

    workers: int

    @abstractmethod
    def _call(self, requests: dict[int, tuple[Any, ...]], shares: dict[int, list[int]], consume: Callable[[int, Any], None]) -> None:
        """Run ``requests[w]`` on worker ``w`` and pass each reply to ``consume(w, reply)``."""

    def _shares(self, cids: list[int], weights: list[float]) -> dict[int, list[int]]:
        chunks = split_clients(cids, weights, self.workers)
        return {w: chunk for w, chunk in enumerate(chunks) if chunk}

    def _jobs(self, chunk: list[int], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo]) -> list[Job]:
        return [(cid, tasks[cid], infos[cid], self.store.get(cid)) for cid in chunk]

    def train(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo], acc: Accumulator
    ) -> RoundOutcome:
        outcome = RoundOutcome(acc)
        cids = sorted(tasks)
        if not cids:
            return outcome
        # +1: a client with no examples still costs a model load and an upload
        shares = self._shares(cids, [infos[c].num_train + 1.0 for c in cids])
        position = {cid: i for i, cid in enumerate(cids)}
        requests = {
            w: ("train", algorithm, acc.empty(), position[share[0]], self._jobs(share, tasks, infos)) for w, share in shares.items()
        }
        saved: dict[int, dict[str, Any]] = {}
        blocks: dict[Block, Accumulator] = {}

        def merge(w: int, reply: tuple[RoundOutcome, dict[Block, Accumulator], dict[int, dict[str, Any]]]) -> None:
            part, part_blocks, stores = reply
            merge_share(outcome, part)
            blocks.update(part_blocks)
            saved.update(stores)

        self._call(requests, shares, merge)
        for cid in sorted(saved):
            self.store.put(cid, saved[cid])
        return finish_round(outcome, blocks, len(cids))

    def _gather(self, requests: dict[int, tuple[Any, ...]], shares: dict[int, list[int]], cids: list[int]) -> dict[int, Any]:
        merged: dict[int, Any] = {}
        self._call(requests, shares, lambda w, reply: merged.update(reply))
        return {cid: merged[cid] for cid in cids}

    def evaluate(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo]
    ) -> dict[int, Metrics | str]:
        cids = sorted(tasks)
        if not cids:
            return {}
        # shares are cut between eval groups, so that every executor evaluates the same groups
        groups = eval_groups(algorithm, self.world, cids, tasks, infos)
        weights = [sum(infos[c].num_test + 1.0 for c in g) for g in groups]
        shares, requests = {}, {}
        for w, share in self._shares(list(range(len(groups))), weights).items():
            shares[w] = [c for g in share for c in groups[g]]
            requests[w] = ("eval", algorithm, [len(groups[g]) for g in share], self._jobs(shares[w], tasks, infos))
        return self._gather(requests, shares, cids)

    def probe(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo], what: str, batch: int | None = None
    ) -> dict[int, Any]:
        cids = sorted(tasks)
        if not cids:
            return {}
        shares = self._shares(cids, [infos[c].num_train + 1.0 for c in cids])
        requests = {w: ("probe", algorithm, what, batch, self._jobs(share, tasks, infos)) for w, share in shares.items()}
        return self._gather(requests, shares, cids)
