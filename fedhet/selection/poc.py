"""Power-of-Choice: pick the clients with the highest loss among a few sampled candidates.

Paper: Cho, Wang, Joshi, "Towards Understanding Biased Client Selection in Federated Learning",
AISTATS 2022 (https://arxiv.org/abs/2010.01243).

Each round (the Flower baseline's and the paper's procedure):

1. draw a candidate set of ``candidates`` (d) clients without replacement, with probability
   proportional to their training-set sizes, from (seed, "select", round);
2. score each candidate by its local loss at the current global model:
   - ``pow-d``: on its whole training set (the candidates receive the model and send a loss back);
   - ``cpow-d``: on ``batch`` (b = 64) examples it draws at random (cheaper to compute);
   - ``rpow-d``: no extra communication; the loss the client reported when it last trained
     (its mean training loss of that round; never-seen clients score +inf, so they are tried first);
3. keep the ``clients_per_round`` (m) candidates with the highest loss (ties: lower id).

Selecting high-loss clients biases training towards the clients the model serves worst, which
speeds up convergence early on; the state (the stale losses of rpow-d) is in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedhet.core import rng
from fedhet.core.messages import ClientInfo
from fedhet.core.types import Metrics
from fedhet.selection.base import ClientSelector, Probe

#: The Power-of-Choice variants and what each does, in one sentence (``fedhet list``).
VARIANTS = {
    "pow-d": "Power-of-Choice: the m highest-loss clients among d candidates sampled by data size, each scoring its whole training split.",
    "cpow-d": "Power-of-Choice, cheaper: as pow-d, each candidate scoring its loss on a batch of b examples.",
    "rpow-d": "Power-of-Choice without probes: as pow-d, ranking candidates by the loss each last reported in training.",
}


@dataclass(frozen=True)
class PowerOfChoice(ClientSelector):
    """Attributes:
    variant: ``pow-d``, ``cpow-d`` or ``rpow-d``.
    clients_per_round: m, the clients trained each round.
    candidates: d ≥ m, the candidate set sampled by data size.
    batch: b, the examples a cpow-d candidate scores its loss on.
    """

    variant: str = "pow-d"
    clients_per_round: int = 10
    candidates: int = 20
    batch: int = 64

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"selection.name: got {self.variant!r}, allowed: {', '.join(VARIANTS)} (Power-of-Choice)")
        for name in ("clients_per_round", "candidates", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"selection.{name}: got {value!r}, allowed: an integer >= 1")
        if self.candidates < self.clients_per_round:
            raise ValueError(
                f"selection.candidates: got {self.candidates}, allowed: >= selection.clients_per_round ({self.clients_per_round})"
            )

    def init(self, clients: Sequence[ClientInfo]) -> dict[int, float]:
        """rpow-d's stale losses (client id -> its last reported training loss)."""
        return {}

    def candidate_set(self, rnd: int, eligible: Sequence[ClientInfo], seed: int) -> list[int]:
        """d clients without replacement, with probability proportional to their data size."""
        ids = [c.id for c in sorted(eligible, key=lambda c: c.id)]
        d = min(self.candidates, len(ids))
        if d == len(ids):
            return ids
        weights = torch.tensor([max(c.num_train, 0) for c in sorted(eligible, key=lambda c: c.id)], dtype=torch.float64)
        if float(weights.sum()) <= 0:
            weights = torch.ones(len(ids), dtype=torch.float64)
        picks = torch.multinomial(weights, d, replacement=False, generator=rng.generator(seed, "select", rnd))
        return sorted(ids[i] for i in picks.tolist())

    def select(
        self, state: Any, rnd: int, eligible: Sequence[ClientInfo], seed: int, probe: Probe | None = None
    ) -> tuple[list[int], Any]:
        cands = self.candidate_set(rnd, eligible, seed)
        if self.variant == "rpow-d":
            losses = {c: float(state.get(c, math.inf)) for c in cands}
        else:
            if probe is None:
                raise ValueError(f"selection {self.variant}: needs to probe candidates' losses, but no probe was given")
            answers = probe(cands, "loss", self.batch if self.variant == "cpow-d" else None)
            # a candidate that could not answer is not selected ahead of one that did
            losses = {c: float(answers[c]) if c in answers else -math.inf for c in cands}
        ranked = sorted(cands, key=lambda c: (-losses[c], c))
        return sorted(ranked[: self.clients_per_round]), state

    def update(self, state: Any, rnd: int, metrics: Mapping[int, Metrics]) -> Any:
        if self.variant != "rpow-d":
            return state
        new = dict(state)
        for cid, m in metrics.items():
            loss = m.get("train_loss")
            if loss is not None and loss == loss:
                new[cid] = float(loss)
        return new
