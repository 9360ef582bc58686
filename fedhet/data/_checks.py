"""Option checks shared by the data loaders, partitioners and :func:`federate`.

Every error names the config field (``data.<name>``), the value it got and what is allowed, so a bad
config line can be found without reading a traceback.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any


def fail(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"data.{field}: got {value!r}, allowed: {allowed}")


def reject_unknown(owner: str, unknown: Mapping[str, Any], allowed: list[str]) -> None:
    """Raise a TypeError naming the first unknown option of ``owner`` (a dataset or partitioner)."""
    if unknown:
        name = sorted(unknown)[0]
        listed = ", ".join(sorted(allowed)) or "none"
        raise TypeError(f"{owner}: unknown option {name!r}; allowed options: {listed}")


def integer(field: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]`` (bools and non-integral numbers are refused)."""
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise fail(field, value, allowed)
    if value < minimum or (maximum is not None and value > maximum):
        raise fail(field, value, allowed)
    return int(value)


def fraction(field: str, value: Any, *, allow_zero: bool) -> float:
    """``value`` as a float in ``(0, 1)`` or, with ``allow_zero``, ``[0, 1)``."""
    allowed = "0 <= value < 1" if allow_zero else "0 < value < 1"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise fail(field, value, allowed)
    v = float(value)
    if not (v >= 0.0 if allow_zero else v > 0.0) or not v < 1.0:
        raise fail(field, value, allowed)
    return v


def positive(field: str, value: Any) -> float:
    """``value`` as a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < float("inf"):
        raise fail(field, value, "> 0")
    return float(value)
