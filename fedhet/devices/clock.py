"""The simulated clock: how long a synchronous round lasts, who is late, and who is online.

A selected client's round costs it ``download bytes / down-bandwidth + training FLOPs / throughput +
upload bytes / up-bandwidth + latency`` simulated seconds (:func:`fedhet.devices.profiles.round_seconds`;
the bandwidths are drawn per ``(seed, round, client)``). The server waits for the clients it
selected, so a round lasts as long as its slowest reporting client, except that

- with ``deadline`` the server stops waiting at the deadline: a client that would finish later is a
  *straggler*: it trains, but its update is not aggregated;
- with ``target`` (over-commitment: more clients are selected than the round needs, FedScale's
  1.3x), the server aggregates the first ``target`` clients to finish and stops waiting then; the
  rest are stragglers;
- a client that goes offline before it finishes (its online window closes) drops out of the round;
  the server notices when it goes offline.

Clients that drop out at random (``devices.dropout``) and weak clients left out by ``drop_weak``
take no time. Selection probes and evaluation are not on the clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedhet.devices.profiles import DeviceProfile, RoundCost, round_seconds
from fedhet.devices.schedule import OnlineSchedule


@dataclass(frozen=True)
class Demand:
    """What one client's round asks of its device: bytes down, training FLOPs, bytes up."""

    bytes_down: float
    flops: float
    bytes_up: float


@dataclass(frozen=True)
class RoundPlan:
    """A round on the clock: every client's cost, who is aggregated, who is late or went offline,
    and how long the round lasts (seconds from its start)."""

    costs: dict[int, RoundCost]
    on_time: list[int]
    stragglers: list[int]
    went_offline: list[int]
    duration: float


@dataclass(frozen=True)
class Clock:
    """The devices of a run on a simulated clock (see the module docstring)."""

    profiles: tuple[DeviceProfile, ...]
    seed: int
    deadline: float | None = None
    #: with over-commitment: the clients a round aggregates (the first to finish)
    target: int | None = None
    #: when clients are online (``None``: always)
    schedule: OnlineSchedule | None = None

    def __post_init__(self) -> None:
        if self.deadline is not None and not (self.deadline > 0 and math.isfinite(self.deadline)):
            raise ValueError(f"devices.deadline: got {self.deadline!r}, allowed: a number of seconds > 0, or unset")
        if self.target is not None and self.target < 1:
            raise ValueError(
                f"selection.overcommit: a round must aggregate at least one client, got target {self.target!r}"
            )

    def online(self, cid: int, now: float) -> bool:
        return self.schedule is None or self.schedule.online_until(cid, now) is not None

    def next_online(self, cids: Sequence[int], now: float) -> float | None:
        """The earliest time ``>= now`` at which one of ``cids`` is online (``None``: never again)."""
        if self.schedule is None:
            return now if cids else None
        times = [t for c in cids if (t := self.schedule.next_online(c, now)) is not None]
        return min(times) if times else None

    def cost(self, cid: int, rnd: int, demand: Demand) -> RoundCost:
        return round_seconds(
            self.profiles[cid],
            bytes_down=demand.bytes_down,
            train_flops=demand.flops,
            bytes_up=demand.bytes_up,
            seed=self.seed,
            rnd=rnd,
            cid=cid,
        )

    def plan(self, rnd: int, now: float, demands: Mapping[int, Demand]) -> RoundPlan:
        """The round that starts at ``now`` for the clients of ``demands`` (those sent work)."""
        costs = {cid: self.cost(cid, rnd, demands[cid]) for cid in sorted(demands)}
        went_offline: list[int] = []
        settled: list[float] = []  # when the server learns each client's fate (seconds from now)
        finishing: list[tuple[float, int]] = []
        for cid, c in costs.items():
            until = math.inf if self.schedule is None else self.schedule.online_until(cid, now)
            if until is not None and now + c.total <= until:
                finishing.append((c.total, cid))
            else:
                went_offline.append(cid)
                settled.append(0.0 if until is None else until - now)
        finishing.sort()
        on_time = [cid for t, cid in finishing if self.deadline is None or t <= self.deadline]
        if self.target is not None and len(on_time) >= self.target:
            on_time = on_time[: self.target]
            duration = costs[on_time[-1]].total
        else:
            settled.extend(t for t, _ in finishing)
            duration = max(settled, default=0.0)
            if self.deadline is not None:
                duration = min(duration, self.deadline)
        chosen = set(on_time)
        stragglers = [cid for _, cid in finishing if cid not in chosen]
        return RoundPlan(costs, sorted(on_time), sorted(stragglers), went_offline, duration)


__all__ = ["Clock", "Demand", "RoundPlan"]
