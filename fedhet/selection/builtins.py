"""The built-in client selectors, registered in ``SELECTORS`` under the names ``selection.name`` takes.

A selector factory is called as ``factory(clients_per_round=..., fraction=..., num_clients=...,
**options)`` and returns a :class:`~fedhet.selection.base.ClientSelector`. ``options`` are the
``selection`` keys listed in the factory's ``uses`` (``candidates``, ``batch``, ``refresh_every``)
that are set, plus ``selection.options`` (a plugin selector's own options). A plugin registers its
own selector the same way: ``@SELECTORS.register("name")``.
"""

from __future__ import annotations

import math
from typing import Any

from fedhet.core.registry import SELECTORS
from fedhet.selection.base import ClientSelector, Uniform
from fedhet.selection.divfl import DivFL
from fedhet.selection.poc import VARIANTS, PowerOfChoice


def per_round(clients_per_round: int | None, fraction: float | None, num_clients: int, name: str) -> int:
    """m, the clients a selector picks: ``clients_per_round``, or ``fraction`` of the clients rounded up."""
    if clients_per_round is None and fraction is None:
        raise ValueError(
            f"selection.clients_per_round: missing, allowed: an integer >= 1 (or selection.fraction) for selection {name!r}"
        )
    return clients_per_round or max(1, math.ceil(fraction * num_clients - 1e-9))  # type: ignore[operator]


@SELECTORS.register("uniform")
def uniform(*, clients_per_round: int | None, fraction: float | None, num_clients: int) -> ClientSelector:
    """Uniform sampling: clients_per_round of the eligible clients (or a fraction of them, rounded
    up; unset: all), drawn without replacement."""
    return Uniform(clients_per_round, fraction)


uniform.uses = ()  # type: ignore[attr-defined]


def _power_of_choice(variant: str) -> Any:
    uses = ("candidates", "batch") if variant == "cpow-d" else ("candidates",)

    def make(
        *, clients_per_round: int | None, fraction: float | None, num_clients: int,
        candidates: int | None = None, batch: int | None = None,
    ) -> ClientSelector:  # fmt: skip
        m = per_round(clients_per_round, fraction, num_clients, variant)
        return PowerOfChoice(
            variant=variant, clients_per_round=m, candidates=candidates or min(2 * m, num_clients), batch=batch or 64
        )

    make.__doc__ = VARIANTS[variant]
    make.__name__ = variant.replace("-", "_")
    make.uses = uses  # type: ignore[attr-defined]
    return make


for _variant in VARIANTS:
    SELECTORS.register(_variant)(_power_of_choice(_variant))


@SELECTORS.register("divfl")
def divfl(
    *, clients_per_round: int | None, fraction: float | None, num_clients: int, refresh_every: int | None = None
) -> ClientSelector:
    """DivFL: a diverse subset, the clients whose gradients best represent every eligible client's
    (greedy facility location)."""
    m = per_round(clients_per_round, fraction, num_clients, "divfl")
    return DivFL(clients_per_round=m, refresh_every=refresh_every or 0)


divfl.uses = ("refresh_every",)  # type: ignore[attr-defined]

#: the ``selection`` keys some built-in selector reads
SELECTION_KEYS = ("candidates", "batch", "refresh_every")

__all__ = ["SELECTION_KEYS", "per_round"]
