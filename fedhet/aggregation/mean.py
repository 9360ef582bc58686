"""Weighted mean of client parameters (FedAvg's aggregation)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from fedhet.aggregation import robust
from fedhet.aggregation.base import Accumulator, KeepsUpdates
from fedhet.core.messages import ClientResult, ClientTask
from fedhet.core.types import Params

WEIGHTINGS = ("examples", "uniform")
#: the most elements a model's sums hold in one flat buffer: adding an update to it flattens the
#: update first (a float32 copy, 4 MB at this size), which pays for itself where a model's many
#: small tensors each cost a tensor operation, not for a large model with a few large ones
FLAT_LIMIT = 1 << 20


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
        # The sums of a small model (at most FLAT_LIMIT elements) live in one flat float64 buffer
        # (``_flat``: the names ``_names`` of shapes ``_shapes`` one after another) while every
        # update had the same names in the same order and one dtype: adding an update or merging a
        # partial sum is then one tensor operation, not one per tensor. ``sums`` are views of it,
        # made when asked for. Otherwise ``_sums`` holds them.
        self._sums: dict[str, torch.Tensor] | None = {}
        self._flat: torch.Tensor | None = None
        self._names: tuple[str, ...] = ()
        self._shapes: list[torch.Size] = []
        self.total = 0.0
        self.count = 0

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        """Σ_k w_k θ_k by name, in float64."""
        if self._sums is None:
            assert self._flat is not None
            self._sums = dict(zip(self._names, (part.view(shape) for part, shape in zip(self._flat.split([s.numel() for s in self._shapes]), self._shapes))))
        return self._sums

    def empty(self) -> WeightedSum:
        return WeightedSum(self.weighting, self.rule)

    def reject(self, cids: Collection[int]) -> None:
        for cid in cids:
            update = self.kept.pop(cid, None)
            if update is not None:
                self.total -= update.weight
                self.count -= 1

    def add_params(self, params: Mapping[str, torch.Tensor], weight: float) -> None:
        # weight * value is exact in float64 (integer weights, float32 values): one rounding, so an
        # element's sum is the same whether it is added on its own, in a vector or a fused
        # multiply-add, and the flat buffer holds the bits the tensors would hold one by one.
        values = [v if v.is_cpu and not v.requires_grad else v.detach().cpu() for v in params.values()]
        if self._flat is not None and self._names == tuple(params) and self._shapes == [v.shape for v in values] and _one_dtype(values):
            self._flat.add_(_flatten(values), alpha=weight)
        elif self._flat is None and not self._sums and values and _one_dtype(values) and sum(v.numel() for v in values) <= FLAT_LIMIT:
            self._flat = _flatten(values).to(torch.float64, copy=True).mul_(weight)  # a copy even of float64 values
            self._names, self._shapes, self._sums = tuple(params), [v.shape for v in values], None
        else:
            sums = self.sums
            for name, value in zip(params, values):
                if name in sums:
                    sums[name].add_(value, alpha=weight)  # in place: a view of the buffer stays one
                else:
                    sums[name] = value.to(torch.float64, copy=True).mul_(weight)
                    self._flat = None  # the buffer no longer holds every sum
        self.total += weight
        self.count += 1

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
        if self._flat is not None and other._flat is not None and self._names == other._names and self._shapes == other._shapes:
            self._flat += other._flat
        else:
            sums = self.sums
            for name, value in other.sums.items():
                if name in sums:
                    sums[name] += value
                else:
                    sums[name] = value.clone()
                    self._flat = None
        self.total += other.total
        self.count += other.count

    def absorb(self, other: Accumulator) -> None:
        assert isinstance(other, WeightedSum) and other.weighting == self.weighting
        if self._flat is not None or self._sums or self.kept or self.count:
            self.merge(other)
            return
        # nothing here yet: the sums are other's, not float64 copies of them (the round's root)
        self._sums = None if other._sums is None else dict(other._sums)
        self._flat, self._names, self._shapes = other._flat, other._names, other._shapes
        self.kept, self.total, self.count = dict(other.kept), other.total, other.count
        other._sums, other._flat, other.kept = {}, None, {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._flat is not None:
            state["_sums"] = None  # the buffer travels once, not also as each of its views
        return state

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


def _one_dtype(values: Sequence[torch.Tensor]) -> bool:
    return all(v.dtype == values[0].dtype for v in values)


def _flatten(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The values one after another in one new 1-D tensor (of their one dtype)."""
    return torch.cat([v.reshape(-1) for v in values])


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
