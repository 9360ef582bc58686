"""Weighted mean of client parameters (FedAvg's aggregation)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch

from fedhet.aggregation import robust
from fedhet.aggregation.base import Accumulator, KeepsUpdates
from fedhet.core.messages import ClientResult, ClientTask
from fedhet.core.types import Params

WEIGHTINGS = ("examples", "uniform")


class WeightedSum(KeepsUpdates):
    """Σ_k w_k θ_k and Σ_k w_k, in float64; ``w_k`` = the client's example count, or 1 (``uniform``).

    With a robust rule (``use_rule``) it keeps each client's update instead, and ``mean`` is the
    rule's combination (``fedhet.aggregation.robust``)."""

    def __init__(self, weighting: str = "examples", rule: robust.RobustRule | None = None) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: got {weighting!r}, allowed: {', '.join(WEIGHTINGS)}")
        self.weighting = weighting
        self.rule = rule if rule is not None and rule.active else None
        self.kept: dict[int, robust.ClientUpdate] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.total = 0.0
        self.count = 0

    def empty(self) -> WeightedSum:
        return WeightedSum(self.weighting, self.rule)

    def reject(self, cids: Collection[int]) -> None:
        for cid in cids:
            update = self.kept.pop(cid, None)
            if update is not None:
                self.total -= update.weight
                self.count -= 1

    def add_params(self, params: Mapping[str, torch.Tensor], weight: float) -> None:
        # weight * value is exact in float64 (integer weights, float32 values): one rounding. The
        # tensors go through one foreach call where the names are those already summed (or none
        # are): on the CPU the same kernel per tensor, without a Python call for each.
        values = [v.detach().cpu() for v in params.values()]
        if values and self.sums.keys() == params.keys():
            torch._foreach_add_(list(self.sums.values()), [values[i] for i in self._order(params)], alpha=weight)
        elif values and not self.sums:
            new = [v.to(torch.float64, copy=True) for v in values]  # a copy even of float64 values
            torch._foreach_mul_(new, weight)
            self.sums = dict(zip(params, new))
        else:
            for name, value in zip(params, values):
                if name in self.sums:
                    self.sums[name].add_(value, alpha=weight)
                else:
                    self.sums[name] = value.to(torch.float64, copy=True).mul_(weight)
        self.total += weight
        self.count += 1

    def _order(self, params: Mapping[str, torch.Tensor]) -> range | list[int]:
        """Where each summed name is in ``params`` (which holds the same names)."""
        if all(a == b for a, b in zip(self.sums, params)):
            return range(len(params))
        position = {name: i for i, name in enumerate(params)}
        return [position[name] for name in self.sums]

    def add(self, cid: int, task: ClientTask, result: ClientResult) -> None:
        weight = float(result.num_examples) if self.weighting == "examples" else 1.0
        if self.rule is not None:
            self.kept[cid] = robust.make_update(cid, weight, result.params, task.params)
            self.total += weight
            self.count += 1
            return
        self.add_params(result.params, weight)

    def merge(self, other: Accumulator) -> None:
        assert isinstance(other, WeightedSum) and other.weighting == self.weighting
        self.kept.update(other.kept)
        if self.sums.keys() == other.sums.keys():
            if self.sums:
                torch._foreach_add_(list(self.sums.values()), [other.sums[name] for name in self.sums])
        else:
            for name, value in other.sums.items():
                if name in self.sums:
                    self.sums[name] += value
                else:
                    self.sums[name] = value.clone()
        self.total += other.total
        self.count += other.count

    def absorb(self, other: Accumulator) -> None:
        assert isinstance(other, WeightedSum) and other.weighting == self.weighting
        if self.sums or self.kept or self.count:
            self.merge(other)
            return
        # nothing here yet: the sums are other's, not float64 copies of them (the round's root)
        self.sums, self.kept = dict(other.sums), dict(other.kept)
        self.total, self.count = other.total, other.count
        other.sums, other.kept = {}, {}

    def mean(self, reference: Mapping[str, torch.Tensor]) -> Params:
        """The weighted mean, cast to each reference tensor's dtype and device.

        Entries no client sent, and everything when the total weight is 0, keep the reference value.
        Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) are rounded. With a robust rule:
        ``reference`` moved by the rule's combination of the kept updates.
        """
        if self.rule is not None:
            return robust.apply(reference, *robust.combine(list(self.kept.values()), self.rule))
        out: Params = {}
        for name, ref in reference.items():
            if name not in self.sums or self.total <= 0:
                out[name] = ref.detach().clone()
                continue
            avg = self.sums[name] / self.total
            if not ref.is_floating_point():
                avg = torch.round(avg)
            out[name] = avg.to(dtype=ref.dtype, device=ref.device)
        return out


def weighted_mean(params: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Params:
    """Σ_k w_k θ_k / Σ_k w_k for every tensor name of ``params[0]``."""
    if len(params) != len(weights):
        raise ValueError(f"weighted_mean: {len(params)} parameter sets but {len(weights)} weights")
    if not params:
        raise ValueError("weighted_mean: no parameter sets to average")
    acc = WeightedSum()
    for p, w in zip(params, weights, strict=True):
        if w < 0:
            raise ValueError(f"weighted_mean: weight {w!r} is negative; allowed: weights >= 0")
        acc.add_params(p, float(w))
    return acc.mean(params[0])


class GroupedSum(Accumulator):
    """One :class:`WeightedSum` per group of clients, the group read by ``key_of(task, result)`` (a
    picklable callable: the task's model config for tiers, the cluster a client chose for IFCA):
    per-tier or per-cluster averages that still merge across worker processes. ``members`` records
    each client's group."""

    def __init__(self, key_of, weighting: str = "examples", rule: robust.RobustRule | None = None) -> None:  # noqa: ANN001
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: got {weighting!r}, allowed: {', '.join(WEIGHTINGS)}")
        self.key_of = key_of
        self.weighting = weighting
        self.rule = rule
        self.groups: dict = {}
        self.members: dict = {}
        self.count = 0

    def empty(self) -> GroupedSum:
        return type(self)(self.key_of, self.weighting, self.rule)

    def use_rule(self, rule: robust.RobustRule) -> bool:
        """The rule combines the updates within each group (a tier's, a cluster's)."""
        self.rule = rule
        return True

    def kept_updates(self) -> dict[int, robust.ClientUpdate]:
        return {cid: u for group in self.groups.values() for cid, u in group.kept.items()}

    def reject(self, cids: Collection[int]) -> None:
        for cid in cids:
            key = self.members.pop(cid, None)
            if key is not None and cid in self.groups[key].kept:
                self.groups[key].reject([cid])
                self.count -= 1

    def add(self, cid: int, task: ClientTask, result: ClientResult) -> None:
        key = self.key_of(task, result)
        if key not in self.groups:
            self.groups[key] = WeightedSum(self.weighting, self.rule)
        self.groups[key].add(cid, task, result)
        self.members[cid] = key
        self.count += 1

    def merge(self, other: Accumulator) -> None:
        assert isinstance(other, GroupedSum) and other.weighting == self.weighting
        for key, acc in other.groups.items():
            if key in self.groups:
                self.groups[key].merge(acc)
            else:
                self.groups[key] = acc
        self.members.update(other.members)
        self.count += other.count
