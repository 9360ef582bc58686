"""Plain type aliases used across fedhet."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

import torch

#: Model parameters keyed by their ``state_dict`` name; buffers (BatchNorm statistics) included.
Params: TypeAlias = dict[str, torch.Tensor]
#: Scalar metrics, e.g. ``{"loss": 0.41, "accuracy": 0.88}``.
Metrics: TypeAlias = dict[str, float]
ClientId: TypeAlias = int
ConfigValue: TypeAlias = bool | int | float | str | None
#: A flat configuration that crosses the wire with a task (what model to build, local hyperparameters).
Config: TypeAlias = Mapping[str, ConfigValue]


def params_nbytes(params: Mapping[str, torch.Tensor]) -> int:
    """Bytes needed to send ``params`` densely (what an upload or download costs)."""
    return sum(t.numel() * t.element_size() for t in params.values())


def clone_params(params: Mapping[str, torch.Tensor]) -> Params:
    """A detached copy that shares no storage with ``params``."""
    return {k: v.detach().clone() for k, v in params.items()}
