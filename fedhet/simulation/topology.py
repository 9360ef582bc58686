"""Who talks to whom in decentralized training: each client's neighbours in a round.

- ``ring``: clients ``i − 1`` and ``i + 1`` (mod N); fixed.
- ``full``: every other client; fixed.
- ``random``: ``k`` other clients drawn afresh every round, for every client independently, from a
  generator keyed by ``(seed, "topology", round, client)`` — a time-varying directed graph (DisPFL's
  ``cs: random``): a client receives from its ``k`` neighbours; a neighbour need not receive back.

``neighbours`` never includes the client itself; algorithms add their own model where they use it.
"""

from __future__ import annotations

import torch

from fedhet.core import rng

TOPOLOGIES = ("ring", "full", "random")


def neighbours(kind: str, num_clients: int, rnd: int, seed: int, k: int | None = None) -> dict[int, list[int]]:
    """Each client's sorted neighbours in round ``rnd``."""
    if kind not in TOPOLOGIES:
        raise ValueError(f"topology: got {kind!r}, allowed: {', '.join(TOPOLOGIES)}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients: got {num_clients!r}, allowed: an integer >= 1")
    n = num_clients
    if kind == "ring":
        return {i: sorted({(i - 1) % n, (i + 1) % n} - {i}) for i in range(n)}
    if kind == "full":
        return {i: [j for j in range(n) if j != i] for i in range(n)}
    if k is None or isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
        raise ValueError(f"topology.k: got {k!r}, allowed: an integer in [1, {n - 1}] (other clients)")
    out = {}
    for i in range(n):
        g = rng.generator(seed, "topology", rnd, i)
        others = [j for j in range(n) if j != i]
        out[i] = sorted(others[int(p)] for p in torch.randperm(len(others), generator=g)[:k])
    return out
