"""DivFL: select a diverse subset of clients whose gradients represent everyone's.

Paper: Balakrishnan, Li, Zhou, Himayat, Smith, Bilmes, "Diverse Client Selection for Federated
Learning via Submodular Maximization", ICLR 2022 (https://openreview.net/forum?id=nwKXyFvaUm).

Each client k is represented by its full local gradient g_k at the global model. With the
dissimilarity ``D[k, j] = ‖g_k − g_j‖₂``, DivFL picks the ``clients_per_round`` (m) clients S that
minimise the facility-location cost ``Σ_k min_{j∈S} D[k, j]``: every client is close to some
selected one, so the selected clients' aggregate approximates the full gradient. The set is built
greedily (each step adds the client with the largest cost reduction; ties: lower id), which gives
the same set as the authors' lazy greedy and the (1 − 1/e) guarantee of submodular maximisation.

Staleness (the authors' communication-saving variant): every client's gradient is probed in the
first round only; afterwards only the selected clients send fresh gradients (they compute them at
the start of local training anyway), and the other rows stay as they were. ``refresh_every: r > 0``
re-probes every eligible client every r rounds. The rows are the selector's state, in the
checkpoint. Clients whose gradients differ in length (different sub-model sizes) cannot be compared:
that is refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedhet.core.messages import ClientInfo
from fedhet.selection.base import ClientSelector, Probe


def facility_location(distances: torch.Tensor, m: int) -> list[int]:
    """Greedy facility location: ``m`` column indices S minimising ``Σ_k min_{j∈S} D[k, j]``
    (rows: clients to be represented; columns: candidates). Ties go to the lower index."""
    n = distances.shape[1]
    m = min(m, n)
    d = distances.to(torch.float64)
    # before anything is chosen every client is "served" at the largest distance, so the first pick
    # is the medoid (smallest Σ_k D[k, j])
    current = torch.full((d.shape[0],), float(d.max()) if d.numel() else 0.0, dtype=torch.float64)
    chosen: list[int] = []
    for _ in range(m):
        gains = torch.clamp(current.unsqueeze(1) - d, min=0.0).sum(dim=0)
        if chosen:
            gains[chosen] = -1.0
        j = int(torch.argmax(gains))  # argmax returns the first maximum: the lower index on ties
        chosen.append(j)
        current = torch.minimum(current, d[:, j])
    return chosen


@dataclass(frozen=True)
class DivFL(ClientSelector):
    """DivFL: a diverse subset, the clients whose gradients best represent every eligible client's
    (greedy facility location).

    Attributes:
    clients_per_round: m, the clients trained each round.
    refresh_every: re-probe every eligible client's gradient every this many rounds (0: only in
        the first round; afterwards only the selected clients' gradients are refreshed).
    """

    clients_per_round: int = 10
    refresh_every: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.clients_per_round, bool) or not isinstance(self.clients_per_round, int) or self.clients_per_round < 1:
            raise ValueError(f"selection.clients_per_round: got {self.clients_per_round!r}, allowed: an integer >= 1")
        if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int) or self.refresh_every < 0:
            raise ValueError(f"selection.refresh_every: got {self.refresh_every!r}, allowed: an integer >= 0")

    def init(self, clients: Sequence[ClientInfo]) -> dict[int, torch.Tensor]:
        """Each client's last known gradient at the global model (client id -> 1-D tensor)."""
        return {}

    def select(
        self, state: Any, rnd: int, eligible: Sequence[ClientInfo], seed: int, probe: Probe | None = None
    ) -> tuple[list[int], Any]:
        if probe is None:
            raise ValueError("selection divfl: needs to probe clients' gradients, but no probe was given")
        rows = dict(state)
        ids = sorted(c.id for c in eligible)
        refresh_all = not rows or (self.refresh_every > 0 and (rnd - 1) % self.refresh_every == 0)
        missing = ids if refresh_all else [c for c in ids if c not in rows]
        if missing:
            rows.update(probe(missing, "grad", None))
        known = [c for c in ids if c in rows]
        if len(known) <= self.clients_per_round:
            chosen = known
        else:
            lengths = {int(rows[c].numel()) for c in known}
            if len(lengths) > 1:
                raise ValueError(
                    f"selection divfl: clients' gradients have different lengths {sorted(lengths)} (sub-models of "
                    "different sizes); allowed: clients that all train the same model"
                )
            g = torch.stack([rows[c].to(torch.float64) for c in known])
            chosen = [known[i] for i in facility_location(torch.cdist(g, g), self.clients_per_round)]
        chosen = sorted(chosen)
        if not refresh_all:
            # the selected clients' rows are refreshed at this round's model (the stale rows of the
            # others stay): the communication-efficient variant of the authors' code
            rows.update(probe(chosen, "grad", None))
        return chosen, rows
