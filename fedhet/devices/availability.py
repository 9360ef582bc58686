"""Whether a client can be reached in a round, and whether a selected one drops out of it.

- ``unavailable``: a client is offline for the whole round with this probability (from
  ``(seed, "offline", round, client)``); selectors never see it, so it cannot be picked.
- ``dropout``: a selected client fails to report back (a straggler) with this probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedhet.core import rng


@dataclass(frozen=True)
class Availability:
    """Each client is independently offline in a round with probability ``unavailable`` and, when
    selected, fails to report with probability ``dropout``."""

    dropout: float = 0.0  # probability that a selected client drops out of a round
    unavailable: float = 0.0  # probability that a client is offline (not selectable) in a round

    def __post_init__(self) -> None:
        for name in ("dropout", "unavailable"):
            d = getattr(self, name)
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or not 0.0 <= d < 1.0:
                raise ValueError(f"devices.{name}: got {d!r}; allowed: a number with 0 <= {name} < 1")

    def offline(self, cid: int, rnd: int, seed: int) -> bool:
        """Whether client ``cid`` cannot be reached in round ``rnd``; a function of ``(seed, rnd, cid)``."""
        if self.unavailable == 0.0:
            return False
        u = torch.rand((), generator=rng.generator(seed, "offline", rnd, cid), dtype=torch.float64)
        return bool(u.item() < self.unavailable)

    def dropped(self, cid: int, rnd: int, seed: int) -> bool:
        """Whether client ``cid`` drops out of round ``rnd``; a function of ``(seed, rnd, cid)`` only."""
        if self.dropout == 0.0:
            return False
        u = torch.rand((), generator=rng.generator(seed, "dropout", rnd, cid), dtype=torch.float64)
        return bool(u.item() < self.dropout)
