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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedhet.core.messages import ClientInfo, ModelSize
from fedhet.devices.availability import Availability
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
        """Every client's info in round ``rnd``, with the size the policy lets it train."""
        tier_idx = assign_tiers(self.num_clients, self.tiers, mode=self.assignment, seed=self.seed, rnd=rnd)
        out = []
        by_name = {t.name: t for t in self.tiers}
        for cid, t in enumerate(tier_idx):
            reported = self.reported_tiers[cid] if cid < len(self.reported_tiers) else None
            tier = by_name[reported] if reported is not None else self.tiers[t]
            size = tier.size if self.policy == "tiered" else self.global_size
            out.append(ClientInfo(cid, self.num_train[cid], self.num_test[cid], tier.name, size, self.label_counts[cid]))
        return out

    def eligible(self, infos: Sequence[ClientInfo], rnd: int | None = None) -> list[ClientInfo]:
        """Clients that may be selected for training in round ``rnd``: online ones (see
        ``Availability.unavailable``); with ``drop_weak`` drawn ``before_selection``, only those of the
        largest tier."""
        out = list(infos)
        if rnd is not None:
            out = [c for c in out if not self.availability.offline(c.id, rnd, self.seed)]
        if self.policy != "drop_weak" or self.drop_weak != "before_selection":
            return out
        return [c for c in out if not self.weak(c)]

    def weak(self, info: ClientInfo) -> bool:
        """Whether ``drop_weak`` leaves this client out of training (a tier below the largest)."""
        return self.policy == "drop_weak" and info.tier != largest(self.tiers).name

    def dropped(self, cid: int, rnd: int) -> bool:
        return self.availability.dropped(cid, rnd, self.seed)
