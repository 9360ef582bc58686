"""When each client is online, in simulated seconds: a daily window or a per-client trace.

An :class:`OnlineSchedule` holds each client's online intervals ``[start, end)``. With a ``period``
(a day, 86,400 s, for daily windows) the intervals lie in ``[0, period)`` and repeat every period;
without one they are absolute times and a client is offline after its last interval.

- :func:`daily_schedule`: each client is online ``hours`` hours a day from its ``start`` hour (the
  profile's ``online_start``, or an hour drawn from ``(seed, "online_start", client)``), so a
  population spread over the day is online a share ``hours / 24`` of the time, as phones that train
  only while charging at night in different time zones.
- :func:`read_trace`: a CSV or JSON file of rows ``client, start, end`` (seconds), every client at
  least once.

A client is eligible for a round when it is online at the round's start, and it drops out of the
round when it goes offline before it has finished (:meth:`OnlineSchedule.online_until`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from fedhet.core import rng
from fedhet.devices._files import read_rows

DAY = 86_400.0
HOUR = 3_600.0
TRACE_COLUMNS = ("client", "start", "end")


@dataclass(frozen=True)
class OnlineSchedule:
    """Each client's online intervals (sorted, disjoint, non-adjacent), repeating every ``period``
    seconds (``None``: absolute times, once)."""

    windows: tuple[tuple[tuple[float, float], ...], ...]
    period: float | None = DAY

    def always(self, cid: int) -> bool:
        """Whether client ``cid`` is online at every time."""
        w = self.windows[cid]
        return self.period is not None and len(w) == 1 and w[0] == (0.0, self.period)

    def online_until(self, cid: int, t: float) -> float | None:
        """``None`` when client ``cid`` is offline at time ``t``; else the time it goes offline
        (``math.inf``: never)."""
        w = self.windows[cid]
        if self.always(cid):
            return math.inf
        if self.period is None:
            for s, e in w:
                if s <= t < e:
                    return e
            return None
        base = math.floor(t / self.period) * self.period
        local = t - base
        for s, e in w:
            if s <= local < e:
                if e >= self.period and w[0][0] == 0.0:  # the window runs on into the next period
                    return base + self.period + w[0][1]
                return base + e
        return None

    def next_online(self, cid: int, t: float) -> float | None:
        """The earliest time ``>= t`` at which client ``cid`` is online (``None``: never again)."""
        if self.online_until(cid, t) is not None:
            return t
        w = self.windows[cid]
        if not w:
            return None
        if self.period is None:
            later = [s for s, _ in w if s > t]
            return min(later) if later else None
        base = math.floor(t / self.period) * self.period
        local = t - base
        for s, _ in w:
            if s > local:
                return base + s
        return base + self.period + w[0][0]


def _merged(intervals: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


def daily_window(start_hour: float, hours: float) -> tuple[tuple[float, float], ...]:
    """The intervals within one day of a window of ``hours`` hours opening at ``start_hour``."""
    if hours >= 24:
        return ((0.0, DAY),)
    a = (start_hour % 24) * HOUR
    b = a + hours * HOUR
    return _merged([(a, b)] if b <= DAY else [(0.0, b - DAY), (a, DAY)])


def daily_schedule(hours: Sequence[float], starts: Sequence[float | None], seed: int) -> OnlineSchedule:
    """Client ``i`` online ``hours[i]`` hours a day from ``starts[i]`` (an hour of the day; ``None``:
    drawn uniformly from ``[0, 24)`` with the generator for ``(seed, "online_start", i)``)."""
    windows = []
    for cid, (h, s) in enumerate(zip(hours, starts)):
        if s is None:
            s = float(rng.numpy_rng(seed, "online_start", cid).uniform(0.0, 24.0))
        windows.append(daily_window(s, h))
    return OnlineSchedule(tuple(windows), DAY)


def read_trace(path: str | os.PathLike[str], num_clients: int, period: float | None = None) -> OnlineSchedule:
    """Online intervals from a file of rows ``client, start, end`` (seconds; ``start < end``; within
    ``[0, period]`` when the trace repeats every ``period`` seconds). Clients ``0..num_clients-1``
    must each have at least one row. Errors name the file, the row and the column."""
    p, rows, columns = read_rows(path, "devices.availability.trace", "with keys client, start, end")
    if sorted(columns) != sorted(TRACE_COLUMNS):
        raise ValueError(
            f"devices.availability.trace: {p} has columns {', '.join(columns) or '(none)'}; "
            f"allowed: exactly {', '.join(TRACE_COLUMNS)}"
        )
    per_client: list[list[tuple[float, float]]] = [[] for _ in range(num_clients)]
    for i, row in enumerate(rows, 1):
        if sorted(row) != sorted(TRACE_COLUMNS):
            raise ValueError(
                f"devices.availability.trace: {p} row {i} has keys {', '.join(row)}; allowed: exactly {', '.join(TRACE_COLUMNS)}"
            )
        values = []
        for key in TRACE_COLUMNS:
            try:
                v = float(row[key])
            except (TypeError, ValueError):
                raise ValueError(
                    f"devices.availability.trace: {p} row {i}: {key} got {row[key]!r}, allowed: a number"
                ) from None
            if not math.isfinite(v) or v < 0:
                raise ValueError(
                    f"devices.availability.trace: {p} row {i}: {key} got {row[key]!r}, allowed: a finite number >= 0"
                )
            values.append(v)
        cid, start, end = values
        if cid != int(cid) or not 0 <= cid < num_clients:
            raise ValueError(
                f"devices.availability.trace: {p} row {i}: client got {row['client']!r}, allowed: an integer 0..{num_clients - 1}"
            )
        if not start < end:
            raise ValueError(f"devices.availability.trace: {p} row {i}: start {start:g} is not before end {end:g}")
        if period is not None and end > period:
            raise ValueError(
                f"devices.availability.trace: {p} row {i}: end {end:g} is after the period {period:g}; allowed: 0 <= start < end <= period"
            )
        per_client[int(cid)].append((start, end))
    missing = [c for c, w in enumerate(per_client) if not w]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"devices.availability.trace: {p} has no rows for clients {shown}; allowed: every client 0..{num_clients - 1} at least once"
        )
    return OnlineSchedule(tuple(_merged(w) for w in per_client), period)


__all__ = ["DAY", "OnlineSchedule", "daily_schedule", "daily_window", "read_trace"]
