"""The fleet: which tier each client is in each round, and what model size that lets it train.

The device policy turns tiers into the sizes clients train, which is how the papers' comparisons
are configurations of the same code:

- ``tiered``: each client trains its tier's size (needs an algorithm with sub-models);
- ``all_large``: every client trains the largest tier's model, resource limits ignored;
- ``all_small``: every client trains the smallest tier's model;
- ``drop_weak``: clients below the largest tier are left out of training; the rest train the largest.
  By default (``devices.drop_weak: after_selection``) the round's clients are drawn from the whole
  population and the weak ones among them are left out, as in the papers, so strong clients take
  part exactly as often as under any other policy; ``before_selection`` draws among the strong
  clients only (each then takes part more often);
- ``auto``: ``tiered`` for algorithms with sub-models (or personal models), else ``all_large``.

With device profiles (``devices.profiles``), ``auto`` fits each client to its device: it trains the
largest size among the tiers that its memory holds and, with a deadline, that it can train in time
(:mod:`fedhet.devices.capacity`); its tier is that size's. Under every policy a client whose device
cannot hold the size the policy gives it (under ``auto``: not even the smallest) is excluded from
the run: never selected. ``drop_weak`` draws from the same clients as ``auto`` and leaves out those
whose capacity is below the largest size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedhet.core.messages import ClientInfo, ModelSize
from fedhet.devices.availability import Availability
from fedhet.devices.profiles import DeviceProfile
from fedhet.devices.tiers import Tier, assign_tiers, largest, smallest

#: Device policies and what each does, in one sentence (``fedhet list``).
POLICIES = {
    "auto": "The algorithm's own policy: tiered for algorithms with sub-models or personal models, else all_large.",
    "tiered": "Each client trains the model size of its tier (needs an algorithm with sub-models).",
    "all_large": "Every client trains the largest tier's model, its resource limits ignored (the AllLarge baseline).",
    "all_small": "Every client trains the smallest tier's model (the AllSmall baseline).",
    "drop_weak": "Clients below the largest tier are left out and the rest train the largest model (the DropWeak baseline).",
}
DROP_WEAK = ("after_selection", "before_selection")


def resolve_policy(policy: str, heterogeneous: bool, algorithm: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"devices.policy: got {policy!r}, allowed: {', '.join(POLICIES)}")
    if policy == "auto":
        return "tiered" if heterogeneous else "all_large"
    if policy == "tiered" and not heterogeneous:
        raise ValueError(
            f"devices.policy: got 'tiered', but algorithm {algorithm!r} trains one model size; "
            "allowed for it: all_large, all_small, drop_weak (or an algorithm with sub-models)"
        )
    return policy


@dataclass(frozen=True)
class Fleet:
    tiers: tuple[Tier, ...]
    assignment: str
    policy: str
    seed: int
    label_counts: tuple[tuple[int, ...], ...]
    num_train: tuple[int, ...]
    num_test: tuple[int, ...]
    availability: Availability = Availability()
    #: tiers that clients report themselves (deployed nodes' ``tier``), by client; ``None`` or an
    #: empty tuple: the tier comes from ``assignment``
    reported_tiers: tuple[str | None, ...] = ()
    #: with ``drop_weak``: leave weak clients out ``after_selection`` (like-for-like) or ``before_selection``
    drop_weak: str = "after_selection"
    #: each client's device (empty: no profiles; tiers are labels)
    profiles: tuple[DeviceProfile, ...] = ()
    #: per client, the tier of the largest size its device trains within memory and deadline
    #: (``None``: not even the smallest), and within memory alone (:func:`fedhet.devices.capacity.fit_capacity`)
    capacity: tuple[str | None, ...] = ()
    memory_fit: tuple[str | None, ...] = ()
    #: tiers come from ``capacity`` (policy ``auto`` with profiles), not from ``assignment``
    fitted: bool = False

    def __post_init__(self) -> None:
        if self.drop_weak not in DROP_WEAK:
            raise ValueError(f"devices.drop_weak: got {self.drop_weak!r}, allowed: {', '.join(DROP_WEAK)}")
        names = [t.name for t in self.tiers]
        for cid, name in enumerate(self.reported_tiers):
            if name is not None and name not in names:
                raise ValueError(f"client {cid} reports tier {name!r}; allowed: {', '.join(names)} (devices.tiers)")

    @property
    def num_clients(self) -> int:
        return len(self.num_train)

    @property
    def global_size(self) -> ModelSize:
        return smallest(self.tiers).size if self.policy == "all_small" else largest(self.tiers).size

    @property
    def sizes(self) -> tuple[ModelSize, ...]:
        """Every size a client may be given (distinct, largest first)."""
        if self.policy != "tiered":
            return (self.global_size,)
        return tuple(sorted({t.size for t in self.tiers}, key=lambda s: -s.scale()))

    def infos(self, rnd: int) -> list[ClientInfo]:
        """Every client's info in round ``rnd``, with the size the policy lets it train. With the
        ``fixed`` assignment nothing in it changes between rounds: it is built once (100,000
        registered clients took a quarter of a second a round to build again)."""
        if self.assignment != "fixed":
            return self._build_infos(rnd)
        cached = self.__dict__.get("_fixed_infos")
        if cached is None:
            cached = self.__dict__["_fixed_infos"] = tuple(self._build_infos(rnd))
        return list(cached)

    def _build_infos(self, rnd: int) -> list[ClientInfo]:
        tier_idx = assign_tiers(self.num_clients, self.tiers, mode=self.assignment, seed=self.seed, rnd=rnd)
        out = []
        by_name = {t.name: t for t in self.tiers}
        everyone = self.global_size  # once, not once a client (100,000 registered clients)
        for cid, t in enumerate(tier_idx):
            reported = self.reported_tiers[cid] if cid < len(self.reported_tiers) else None
            if self.fitted:
                reported = self.capacity[cid] or smallest(self.tiers).name
            tier = by_name[reported] if reported is not None else self.tiers[t]
            size = tier.size if self.policy == "tiered" else everyone
            out.append(ClientInfo(cid, self.num_train[cid], self.num_test[cid], tier.name, size, self.label_counts[cid]))
        return out

    def _holds(self, cid: int, tier: str) -> bool:
        """Whether client ``cid``'s memory holds the size of ``tier`` (no profiles: always)."""
        if not self.profiles:
            return True
        fit = self.memory_fit[cid]
        by_name = {t.name: t for t in self.tiers}
        return fit is not None and by_name[fit].size.scale() >= by_name[tier].size.scale()

    def excluded(self, info: ClientInfo) -> bool:
        """Whether the client's device cannot train the size the policy gives it (it is never selected)."""
        if not self.profiles:
            return False
        if self.fitted or self.policy == "drop_weak":
            # drop_weak draws from the clients auto would train and leaves the weak ones out (like-for-like)
            return self.capacity[info.id] is None
        if self.policy == "tiered":
            return not self._holds(info.id, info.tier)
        if self.policy == "all_small":
            return not self._holds(info.id, smallest(self.tiers).name)
        return not self._holds(info.id, largest(self.tiers).name)

    def eligible(self, infos: Sequence[ClientInfo], rnd: int | None = None) -> list[ClientInfo]:
        """Clients that may be selected for training in round ``rnd``: online ones (see
        ``Availability.unavailable``) whose device holds their size; with ``drop_weak`` drawn
        ``before_selection``, only those of the largest tier."""
        out = [c for c in infos if not self.excluded(c)] if self.profiles else list(infos)
        if rnd is not None and self.availability.unavailable > 0:
            out = [c for c in out if not self.availability.offline(c.id, rnd, self.seed)]
        if self.policy != "drop_weak" or self.drop_weak != "before_selection":
            return out
        return [c for c in out if not self.weak(c)]

    def weak(self, info: ClientInfo) -> bool:
        """Whether ``drop_weak`` leaves this client out of training (a tier below the largest; with
        profiles, a device that cannot train the largest size within memory and deadline)."""
        if self.policy != "drop_weak":
            return False
        if self.profiles:
            return self.capacity[info.id] != largest(self.tiers).name
        return info.tier != largest(self.tiers).name

    def dropped(self, cid: int, rnd: int) -> bool:
        return self.availability.dropped(cid, rnd, self.seed)
