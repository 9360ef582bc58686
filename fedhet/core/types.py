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


#: A hashable form of a Config (model configs key caches, families and tiers).
ConfigKey: TypeAlias = tuple[tuple[str, ConfigValue], ...]


def config_key(config: Config) -> ConfigKey:
    return tuple(sorted(config.items()))


def params_nbytes(params: Mapping[str, torch.Tensor]) -> int:
    """Bytes needed to send ``params`` densely (what an upload or download costs)."""
    return sum(t.numel() * t.element_size() for t in params.values())


def sparse_nbytes(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> int:
    """Bytes needed to send ``params`` where only the positions in ``masks`` are kept (tensors
    without a mask go densely): per masked tensor, the kept values plus the cheaper of a bitmap
    (one bit a position, rounded up to whole bytes) and an int32 index per kept value."""
    total = 0
    for name, t in params.items():
        mask = masks.get(name)
        if mask is None:
            total += t.numel() * t.element_size()
            continue
        if tuple(mask.shape) != tuple(t.shape):
            raise ValueError(f"sparse_nbytes: mask of {name} has shape {tuple(mask.shape)}, the tensor {tuple(t.shape)}")
        kept = int(mask.sum())
        total += kept * t.element_size() + min((t.numel() + 7) // 8, 4 * kept)
    return total


def nest(sets: Mapping[object, Mapping[str, torch.Tensor]], prefix: str = "") -> Params:
    """Several parameter sets in one ``Params`` (what a task or result carries when it holds more
    than one model: IFCA's cluster models, DisPFL's neighbour messages): entry ``name`` of the set
    with key ``k`` becomes ``{prefix}{k}/{name}``, in the sets' and their entries' order."""
    return {f"{prefix}{key}/{name}": t for key, params in sets.items() for name, t in params.items()}


def unnest(params: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, Params]:
    """The sets :func:`nest` packed under ``prefix``, by key (a string); entries not under
    ``prefix`` are left out."""
    out: dict[str, Params] = {}
    for full, t in params.items():
        if not full.startswith(prefix):
            continue
        key, sep, name = full[len(prefix) :].partition("/")
        if sep:
            out.setdefault(key, {})[name] = t
    return out


def clone_params(params: Mapping[str, torch.Tensor]) -> Params:
    """A detached copy that shares no storage with ``params``."""
    return {k: v.detach().clone() for k, v in params.items()}
