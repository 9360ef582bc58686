"""Simulated adversarial clients: a seeded share of the clients attack every round they train in.

``Attack.choose`` draws the attackers once per run from ``(seed, "adversaries")``. An attacker
trains as usual and then replaces its upload (model poisoning), or trains on poisoned data:

- ``sign_flip``: sends θ − factor · Δ, its update reversed (Δ = trained − received θ);
- ``scale``: sends θ + factor · Δ, its update magnified;
- ``gaussian``: sends θ + ε, ε ~ N(0, std²) per element, drawn from ``(seed, "attack", round, client)``;
- ``constant``: sends ``value`` in every element;
- ``label_flip``: trains on its data with every label y replaced by C − 1 − y (classification).

Only floating-point entries are changed (integer buffers such as BatchNorm's batch counter are sent
as trained).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from fedhet.core import rng
from fedhet.core.messages import ClientResult, ClientTask
from fedhet.data.base import ArrayDataset

KINDS = ("sign_flip", "scale", "gaussian", "constant", "label_flip")
#: which option each kind uses, and its default
OPTIONS = {
    "sign_flip": ("factor", 1.0),
    "scale": ("factor", 10.0),
    "gaussian": ("std", 1.0),
    "constant": ("value", 1e30),
}


@dataclass(frozen=True)
class Attack:
    """What the attackers do (the ``adversaries`` config section; see the module docstring)."""

    kind: str
    fraction: float
    factor: float | None = None
    std: float | None = None
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"adversaries.kind: got {self.kind!r}, allowed: {', '.join(KINDS)}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"adversaries.fraction: got {self.fraction!r}, allowed: 0 <= fraction <= 1")
        used = OPTIONS.get(self.kind, (None, None))[0]
        for name in ("factor", "std", "value"):
            given = getattr(self, name)
            if given is not None and name != used:
                uses = f"it uses {used}" if used else "it takes no option"
                raise ValueError(
                    f"adversaries.{name}: got {given!r}, but kind {self.kind!r} does not use it ({uses}); allowed: unset"
                )
            if given is not None and not math.isfinite(given):
                raise ValueError(f"adversaries.{name}: got {given!r}, allowed: a finite number")
        if self.std is not None and not self.std > 0:
            raise ValueError(f"adversaries.std: got {self.std!r}, allowed: a number > 0")

    def option(self) -> float:
        """The value of the kind's option (its default when unset)."""
        name, default = OPTIONS[self.kind]
        given = getattr(self, name)
        return float(default if given is None else given)

    def choose(self, num_clients: int, seed: int) -> frozenset[int]:
        """The attackers: ``round(fraction · num_clients)`` clients drawn from ``(seed, "adversaries")``."""
        count = math.floor(self.fraction * num_clients + 0.5)
        order = torch.randperm(num_clients, generator=rng.generator(seed, "adversaries"))
        return frozenset(int(c) for c in order[:count])

    def poison_data(self, data: ArrayDataset, num_classes: int) -> ArrayDataset:
        """``label_flip``: the data with every label y replaced by C − 1 − y; otherwise unchanged."""
        if self.kind != "label_flip":
            return data
        if data.task.kind != "classification":
            raise ValueError(
                f"adversaries.kind: got 'label_flip', but the task is {data.task.kind}; allowed: classification tasks"
            )
        return ArrayDataset(data.x, (num_classes - 1) - data.y, data.task)

    def poison_result(self, task: ClientTask, result: ClientResult, seed: int, cid: int) -> ClientResult:
        """The upload an attacker sends instead of ``result`` (model-poisoning kinds)."""
        if self.kind == "label_flip":
            return result
        option = self.option()
        gen = rng.generator(seed, "attack", task.round, cid)
        params = {}
        for name, value in result.params.items():
            received = task.params.get(name)
            if not value.is_floating_point() or received is None or received.shape != value.shape:
                params[name] = value
            elif self.kind == "sign_flip":
                params[name] = received - option * (value - received)
            elif self.kind == "scale":
                params[name] = received + option * (value - received)
            elif self.kind == "gaussian":
                params[name] = received + option * torch.randn(value.shape, generator=gen, dtype=value.dtype)
            else:  # constant
                params[name] = torch.full_like(value, option)
        return replace(result, params=params)
