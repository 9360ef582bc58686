"""Helpers shared by the model factories: width scaling and option checking."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def scale_width(channels: int, width: float) -> int:
    """Hidden channel count kept at ``width``: ``max(1, ceil(channels * width))``.

    The product is rounded to 9 decimals before the ceiling so that float noise
    (``200 * 0.3 == 60.00000000000001``) does not add a channel.
    """
    return max(1, math.ceil(round(channels * width, 9)))


def take_options(model: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` updated with ``options``; an option the model does not know raises TypeError naming it."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise TypeError(f"model {model!r}: unknown option {unknown[0]!r}; allowed options: {allowed}")
    merged = dict(defaults)
    merged.update(options)
    return merged


def positive_int(model: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model {model!r}: {field} must be an integer >= 1, got {value!r}")
    return value


def positive_ints(model: str, field: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"model {model!r}: {field} must be a sequence of integers >= 1, got {value!r}")
    items = tuple(value)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"model {model!r}: {field} must be a sequence of integers >= 1, got {value!r}")
    return items


def check_input_shape(model: str, input_shape: Any, ndim: int | None = None) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"model {model!r}: input_shape must be positive integers, got {input_shape!r}")
    if ndim is not None and len(shape) != ndim:
        raise ValueError(
            f"model {model!r}: input_shape must have {ndim} dimensions (channels, height, width), got {input_shape!r}"
        )
    return shape


def check_depth(model: str, depth: int | None, blocks: int) -> int:
    """The number of blocks kept at ``depth`` (``None``: all ``blocks``)."""
    if depth is None:
        return blocks
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= blocks:
        raise ValueError(f"model {model!r}: depth must be an integer in 1..{blocks} (its blocks), got {depth!r}")
    return depth


def check_exits(model: str, exits: Any) -> str:
    if exits not in ("last", "all"):
        raise ValueError(f"model {model!r}: exits must be 'last' or 'all', got {exits!r}")
    return str(exits)


def check_flag(model: str, field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"model {model!r}: {field} must be true or false, got {value!r}")
    return value
