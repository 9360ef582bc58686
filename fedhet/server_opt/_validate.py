"""Hyperparameter checks shared by transformations and presets.

Every error names the field as it appears in an experiment file (``server.<field>``), the value it
got and what is allowed, so a bad config line can be found without reading a traceback.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any


def _fail(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"server.{field}: got {value!r}, allowed: {allowed}")


def _real(field: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    # bool is an int subclass; ``b1: true`` in a config is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(field, value, allowed)
    x = float(value)
    # Written as "ok(x)" rather than "bad(x)" so that NaN, which fails every comparison, is rejected.
    if not (math.isfinite(x) and ok(x)):
        raise _fail(field, value, allowed)
    return x


def finite(field: str, value: Any) -> float:
    return _real(field, value, "a finite number", lambda x: True)


def positive(field: str, value: Any) -> float:
    return _real(field, value, f"{field} > 0 (finite)", lambda x: x > 0)


def nonnegative(field: str, value: Any) -> float:
    return _real(field, value, f"{field} >= 0 (finite)", lambda x: x >= 0)


def adaptivity(field: str, value: Any) -> float:
    """τ of the adaptive optimizers: τ² starts their second moment, in float32."""
    return _real(field, value, f"{field} > 0 and {field} <= 1e19 (its square must fit a float32)", lambda x: 0 < x <= 1e19)


def decay(field: str, value: Any) -> float:
    """An exponential-decay rate such as β1, β2 or a momentum coefficient."""
    return _real(field, value, f"0 <= {field} < 1", lambda x: 0 <= x < 1)


def integer(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(field, value, "an integer")
    return int(value)


def boolean(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(field, value, "true or false")
    return value
