"""Partitioners: split a training set over clients, registered in ``fedhet.core.registry.PARTITIONERS``.

A partitioner is ``fn(labels, num_clients, rng, **options) -> list[np.ndarray]``: one sorted int64
index array per client, into ``labels``. The arrays are disjoint and together cover every index.
All randomness comes from ``rng``; pass a generator derived with
``fedhet.core.rng.numpy_rng(seed, "partition")``. Options are checked, and errors name the field
(``data.<option>``), the value and what is allowed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedhet.core.registry import PARTITIONERS
from fedhet.data._checks import fail, integer, positive, reject_unknown


def _check_common(labels: np.ndarray, num_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"partition labels: expected a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"partition labels: got a negative label {int(labels.min())}, allowed: labels >= 0")
    integer("num_clients", num_clients, minimum=1, maximum=max(1, len(labels)))
    return labels


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator, **unknown: Any) -> list[np.ndarray]:
    """A random permutation cut into ``num_clients`` parts whose sizes differ by at most one."""
    reject_unknown("partitioner 'iid'", unknown, [])
    labels = _check_common(labels, num_clients)
    return _finish(np.array_split(rng.permutation(len(labels)), num_clients))


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float | None = None,
    min_size: int = 10,
    max_tries: int = 1000,
    **unknown: Any,
) -> list[np.ndarray]:
    """Label skew: for each class, the shares of its examples over clients are drawn from
    Dir(alpha, ..., alpha) (Hsu et al., 2019, "Measuring the effects of non-identical data
    distribution"). Small ``alpha`` gives each client few classes; large ``alpha`` tends to IID.

    Every client gets at least ``min_size`` examples: a draw that leaves a client smaller is thrown
    away and drawn again, at most ``max_tries`` times, after which a ValueError says what to change.

    Options:
        alpha: the Dirichlet concentration (required; data.alpha).
        min_size: the fewest examples a client may get (data.min_size).
    """
    reject_unknown("partitioner 'dirichlet'", unknown, ["alpha", "min_size", "max_tries"])
    labels = _check_common(labels, num_clients)
    if alpha is None:
        raise fail("alpha", alpha, "> 0 (the Dirichlet concentration is required)")
    alpha = positive("alpha", alpha)
    min_size = integer("min_size", min_size, minimum=0)
    max_tries = integer("max_tries", max_tries, minimum=1)
    n = len(labels)
    if min_size * num_clients > n:
        raise fail(
            "min_size", min_size, f"<= {n // num_clients} ({n} examples over {num_clients} clients)"
        )

    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    smallest = 0
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            # Cut points at the cumulative shares: client k gets members[cuts[k-1]:cuts[k]].
            cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k].append(chunk)
        merged = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
        smallest = min(len(p) for p in merged)
        if smallest >= min_size:
            return _finish(merged)
    raise ValueError(
        f"dirichlet partition: after {max_tries} draws some client still had fewer than "
        f"data.min_size={min_size} examples (smallest last time: {smallest}); raise data.alpha "
        f"(got {alpha}), lower data.min_size, or use fewer clients (got {num_clients})"
    )


@PARTITIONERS.register("shards")
def shards(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    classes_per_client: int | None = None,
    **unknown: Any,
) -> list[np.ndarray]:
    """Pathological label skew (McMahan et al., 2017, "Communication-Efficient Learning of Deep
    Networks from Decentralized Data"): sort by label, cut into ``num_clients * k`` contiguous shards
    of near-equal size, and give each client ``k = classes_per_client`` shards.

    Shards are dealt at random, then pairs of shards are swapped between clients so that no client
    holds two shards with the same majority label whenever a swap can fix it. When every class fills
    a whole number of shards (e.g. equal class sizes divisible by the shards per class) each client
    therefore sees exactly ``k`` classes.

    Options:
        classes_per_client: k, the shards (and so at most the classes) each client gets (required;
            data.classes_per_client).
    """
    reject_unknown("partitioner 'shards'", unknown, ["classes_per_client"])
    labels = _check_common(labels, num_clients)
    if classes_per_client is None:
        raise fail("classes_per_client", classes_per_client, "an integer >= 1 (required)")
    k = integer("classes_per_client", classes_per_client, minimum=1)
    n = len(labels)
    if num_clients * k > n:
        raise fail("classes_per_client", k, f"<= {n // num_clients} ({n} examples over {num_clients} clients)")

    # A random order first, then a stable sort by label: each class's examples are spread over its
    # shards at random.
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(order, num_clients * k)
    majority = np.array([np.bincount(labels[p]).argmax() for p in pieces])
    owner = rng.permutation(num_clients * k).reshape(num_clients, k)  # owner[c] = shard ids of client c
    _remove_repeated_labels(owner, majority, rng)
    return _finish([np.concatenate([pieces[s] for s in row]) for row in owner])


def _remove_repeated_labels(owner: np.ndarray, majority: np.ndarray, rng: np.random.Generator) -> None:
    """Swap shards between clients (in place) until no client holds two shards with one majority
    label, or no swap helps. A swap moves a repeated shard ``s`` of client ``a`` to a client ``b`` that
    lacks its label, and a shard of ``b`` whose label ``a`` lacks back to ``a``: ``a`` loses a repeat
    and ``b`` gains none, so the number of repeats falls with every swap and the loop ends."""
    num_clients, k = owner.shape
    if k == 1:
        return
    for _ in range(owner.size):
        repeated = [
            (a, j)
            for a in range(num_clients)
            for j in range(1, k)
            if majority[owner[a, j]] in majority[owner[a, :j]]
        ]
        if not repeated:
            return
        swapped = False
        for a, j in repeated:
            label_a = set(majority[owner[a]].tolist())
            s = owner[a, j]
            for b in rng.permutation(num_clients):
                if b == a or majority[s] in majority[owner[b]]:
                    continue
                options = [i for i in range(k) if majority[owner[b, i]] not in label_a]
                if options:
                    i = options[int(rng.integers(len(options)))]
                    owner[a, j], owner[b, i] = owner[b, i], s
                    swapped = True
                    break
            if swapped:
                break
        if not swapped:
            return


@PARTITIONERS.register("natural")
def natural(groups: np.ndarray, num_clients: int, rng: np.random.Generator, **unknown: Any) -> list[np.ndarray]:
    """Whole natural groups (a dataset's ``groups``: source document, author, site) per client.

    Groups are dealt in a seeded random order, largest first, each to the client that holds the
    fewest examples so far (a greedy balance, not an optimal one), so a group is never split. With as
    many groups as clients, every client gets exactly one group."""
    reject_unknown("partitioner 'natural'", unknown, [])
    groups = _check_common(groups, num_clients)
    names, inverse = np.unique(groups, return_inverse=True)
    if len(names) < num_clients:
        raise fail("num_clients", num_clients, f"<= the number of natural groups in the data ({len(names)})")
    sizes = np.bincount(inverse)
    order = rng.permutation(len(names))
    order = order[np.argsort(-sizes[order], kind="stable")]
    load = np.zeros(num_clients, np.int64)
    owner = np.empty(len(names), np.int64)
    for g in order:
        c = int(np.argmin(load))
        owner[g] = c
        load[c] += sizes[g]
    return _finish([np.flatnonzero(owner[inverse] == c) for c in range(num_clients)])
