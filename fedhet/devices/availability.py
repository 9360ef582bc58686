"""Whether a selected client drops out of a round (stragglers that never report back)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedhet.core import rng


@dataclass(frozen=True)
class Availability:
    """Each client independently fails to report in a round with probability ``dropout``."""

    dropout: float = 0.0  # probability that a selected client drops out of a round

    def __post_init__(self) -> None:
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or not 0.0 <= d < 1.0:
            raise ValueError(f"devices.dropout: got {d!r}; allowed: a number with 0 <= dropout < 1")

    def dropped(self, cid: int, rnd: int, seed: int) -> bool:
        """Whether client ``cid`` drops out of round ``rnd``; a function of ``(seed, rnd, cid)`` only."""
        if self.dropout == 0.0:
            return False
        u = torch.rand((), generator=rng.generator(seed, "dropout", rnd, cid), dtype=torch.float64)
        return bool(u.item() < self.dropout)
