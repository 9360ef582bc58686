"""Robust aggregation: rules that bound what a few faulty or malicious clients can do to the model.

Every rule works on the clients' updates, Δ_k = (what client k sent) − (what it received), and the
new global value of an element is its old value plus the rule's combination of the Δ_k of the
clients that hold the element. With sub-models (``CoverageSum``: width, depth, masks) a client
holds part of each tensor, and the per-element rules (mean, median, trimmed mean) run per element
over the clients that hold it; the rules that compare whole updates (Krum, the geometric median)
measure a client's distance on the elements it holds (see each function). Elements no client holds
keep their value. With every client at full size each rule is its paper's.

The rules (``aggregation.rule``):

- ``mean``: the weighted mean (FedAvg; weights as the algorithm's ``weighting``);
- ``median``: the coordinate-wise median (Yin et al., ICML 2018; the mean of the two middle values
  for an even count);
- ``trimmed_mean``: per element, the mean after removing the ``floor(trim · n)`` largest and smallest
  of its ``n`` values (Yin et al., ICML 2018);
- ``krum`` / ``multi_krum``: each client scored by the sum of squared distances to its ``n − f − 2``
  nearest others; Krum keeps the lowest-scored update, Multi-Krum averages the ``m`` lowest
  (Blanchard et al., NeurIPS 2017);
- ``geometric_median``: the weighted geometric median by the smoothed Weiszfeld iteration (RFA,
  Pillutla, Kakade and Harchaoui, IEEE TSP 2022).

Two screens come first and combine with any rule: ``norm_bound`` rejects updates whose L2 norm is
above ``norm_bound`` times the round's median update norm (logged as failures with the reason), and
``clip`` scales every update down to at most that L2 norm (norm-difference clipping, Sun et al.
2019).

The median-based rules weight every client equally (a client's example count is what it says it
has, so it cannot buy influence); ``mean``, Multi-Krum's average and the geometric median use the
algorithm's weighting. Robust rules need every update of the round at once: an accumulator with a
rule keeps each client's update (one model's worth of memory per client) instead of a running sum.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedhet.core.types import Params

RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median")


@dataclass(frozen=True)
class RobustRule:
    """How a round's updates are combined (the ``aggregation`` config section).

    Attributes:
        rule: one of ``RULES``.
        trim: ``trimmed_mean``: the fraction of each element's values cut from each end (0 <= trim < 0.5).
        byzantine: ``krum``/``multi_krum``: f, the attackers the rule is sized for (unset: the most Krum
            tolerates among the round's n updates, ``floor((n − 3) / 2)``).
        select: ``multi_krum``: m, the lowest-scored updates averaged (unset: n − f).
        clip: scale each update to at most this L2 norm before the rule (unset: no clipping).
        norm_bound: reject updates whose L2 norm exceeds this times the round's median update norm
            (unset: no check).
        iterations: ``geometric_median``: at most this many Weiszfeld steps.
        smoothing: ``geometric_median``: ν, the smallest distance a weight divides by.
    """

    rule: str = "mean"
    trim: float = 0.1
    byzantine: int | None = None
    select: int | None = None
    clip: float | None = None
    norm_bound: float | None = None
    iterations: int = 10
    smoothing: float = 1e-6

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"aggregation.rule: got {self.rule!r}, allowed: {', '.join(RULES)}")
        if not 0.0 <= self.trim < 0.5:
            raise ValueError(f"aggregation.trim: got {self.trim!r}, allowed: 0 <= trim < 0.5")
        for name in ("clip", "norm_bound"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"aggregation.{name}: got {value!r}, allowed: a number > 0, or unset")
        if self.byzantine is not None and self.byzantine < 0:
            raise ValueError(f"aggregation.byzantine: got {self.byzantine!r}, allowed: an integer >= 0, or unset")
        if self.select is not None and self.select < 1:
            raise ValueError(f"aggregation.select: got {self.select!r}, allowed: an integer >= 1, or unset")
        if self.iterations < 1:
            raise ValueError(f"aggregation.iterations: got {self.iterations!r}, allowed: an integer >= 1")
        if not self.smoothing > 0:
            raise ValueError(f"aggregation.smoothing: got {self.smoothing!r}, allowed: a number > 0")

    @property
    def active(self) -> bool:
        """Whether this differs from the plain streaming mean (then updates are kept, not summed)."""
        return self.rule != "mean" or self.clip is not None or self.norm_bound is not None

    def krum_f(self, n: int) -> int:
        return self.byzantine if self.byzantine is not None else max(0, (n - 3) // 2)


# -- one client's update --------------------------------------------------------------------------


@dataclass
class ClientUpdate:
    """Δ = sent − received for the entries a client holds, client-shaped, in float64.

    ``place[name]``, when given, puts a client-shaped tensor into a zero global-shaped one (a
    sub-model's part); ``held[name]``, when given, is the client-shaped boolean mask of the elements
    the client contributes (Δ is zero elsewhere). ``shapes`` are the global shapes."""

    cid: int
    weight: float
    delta: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    place: dict[str, object] | None = None  # name -> Part (fedhet.submodel.spec)
    held: dict[str, torch.Tensor] | None = None

    @property
    def norm(self) -> float:
        return math.sqrt(sum(float((d * d).sum()) for d in self.delta.values()))

    def scale(self, factor: float) -> None:
        for d in self.delta.values():
            d.mul_(factor)

    def full(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δ, held) of entry ``name`` at the global shape; both zero/false where not held."""
        shape = self.shapes[name]
        d = self.delta[name]
        mask = self.held.get(name) if self.held is not None else None
        part = self.place.get(name) if self.place is not None else None
        if part is None:
            return d, (mask if mask is not None else torch.ones(shape, dtype=torch.bool))
        value = torch.zeros(shape, dtype=torch.float64)
        part.add_into(value, d)  # type: ignore[attr-defined]
        covered = torch.zeros(shape, dtype=torch.float64)
        part.add_into(covered, mask.to(torch.float64) if mask is not None else 1.0)  # type: ignore[attr-defined]
        return value, covered > 0


def make_update(
    cid: int,
    weight: float,
    sent: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    place: Mapping[str, object] | None = None,
    held: Mapping[str, torch.Tensor | None] | None = None,
) -> ClientUpdate:
    """The update of a client that received ``received`` and sent ``sent`` (the entries of ``sent``
    that are in ``received``; with ``place``, only those it names)."""
    delta: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    names = [n for n in sent if n in received and (place is None or n in place)]
    for name in names:
        d = sent[name].detach().cpu().to(torch.float64) - received[name].detach().cpu().to(torch.float64)
        mask = held.get(name) if held is not None else None
        if mask is not None:
            mask = mask.detach().cpu().to(torch.bool)
            d = torch.where(mask, d, torch.zeros((), dtype=torch.float64))
            masks[name] = mask
        delta[name] = d
    global_shapes = {n: tuple(shapes[n]) if shapes is not None else tuple(delta[n].shape) for n in names}
    return ClientUpdate(
        cid, float(weight), delta, global_shapes, dict(place) if place is not None else None, masks or None
    )


# -- the rules, per element -------------------------------------------------------------------------


def coordinate_median(values: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """Per element (dimension 0 indexes clients), the median of the values of the clients that hold
    it: the middle value, or the mean of the two middle values for an even count; 0 where none does."""
    count = held.sum(0)
    ranked = torch.sort(torch.where(held, values, torch.tensor(math.inf, dtype=values.dtype)), dim=0).values
    lo = ((count - 1).clamp_min(0) // 2).unsqueeze(0)
    hi = (count // 2).clamp_max(values.shape[0] - 1).unsqueeze(0)
    mid = (ranked.gather(0, lo) + ranked.gather(0, hi)).squeeze(0) / 2
    return torch.where(count > 0, mid, torch.zeros((), dtype=values.dtype))


def trimmed_mean(values: torch.Tensor, held: torch.Tensor, trim: float) -> torch.Tensor:
    """Per element, the mean of its holders' values after removing the ``floor(trim · n)`` largest
    and smallest of its ``n`` values; 0 where no client holds it."""
    count = held.sum(0)
    cut = torch.floor(count.to(torch.float64) * trim + 1e-9).to(count.dtype)
    ranked = torch.sort(torch.where(held, values, torch.tensor(math.inf, dtype=values.dtype)), dim=0).values
    rank = torch.arange(values.shape[0]).reshape((-1,) + (1,) * (values.dim() - 1))
    keep = (rank >= cut) & (rank < count - cut)
    total = torch.where(keep, ranked, torch.zeros((), dtype=values.dtype)).sum(0)
    kept = (count - 2 * cut).clamp_min(1)
    return torch.where(count > 0, total / kept, torch.zeros((), dtype=values.dtype))


def weighted_mean_held(values: torch.Tensor, held: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per element, Σ w_k Δ_k / Σ w_k over the clients holding it (``weights`` one per client); 0
    where none does."""
    w = weights.reshape((-1,) + (1,) * (values.dim() - 1)).to(values.dtype) * held
    total = w.sum(0)
    return torch.where(total > 0, (values * w).sum(0) / total.clamp_min(1e-300), torch.zeros((), dtype=values.dtype))


# -- the rules over whole updates -----------------------------------------------------------------


def _stacked(updates: Sequence[ClientUpdate]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """Per entry some client holds: its name, the clients' Δ stacked (K, ...) and where each holds it."""
    names = sorted({n for u in updates for n in u.delta})
    for name in names:
        shape = next(u.shapes[name] for u in updates if name in u.shapes)
        values = torch.zeros((len(updates), *shape), dtype=torch.float64)
        held = torch.zeros((len(updates), *shape), dtype=torch.bool)
        for k, u in enumerate(updates):
            if name in u.delta:
                values[k], held[k] = u.full(name)
        yield name, values, held


def pairwise_sq_distances(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """K x K: the mean squared difference of two updates over the elements both hold (for clients at
    full size, the squared L2 distance divided by the model's size); inf for two that share none."""
    k = len(updates)
    sq = torch.zeros((k, k), dtype=torch.float64)
    shared = torch.zeros((k, k), dtype=torch.float64)
    for _, values, held in _stacked(updates):
        d = values.reshape(k, -1)
        h = held.reshape(k, -1).to(torch.float64)
        d2 = d * d
        # Σ_e h_i h_j (d_i − d_j)², with d zero wherever it is not held
        sq += d2 @ h.T + h @ d2.T - 2.0 * (d @ d.T)
        shared += h @ h.T
    out = torch.where(
        shared > 0, sq.clamp_min(0.0) / shared.clamp_min(1.0), torch.tensor(math.inf, dtype=torch.float64)
    )
    out.fill_diagonal_(0.0)
    return out


def krum_scores(distances: torch.Tensor, f: int) -> torch.Tensor:
    """Each client's Krum score: the sum of its squared distances to its ``n − f − 2`` nearest
    others (at least one)."""
    n = distances.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    neighbours = min(n - 1, max(1, n - f - 2))
    others = distances + torch.diag(torch.full((n,), math.inf, dtype=torch.float64))
    return torch.sort(others, dim=1).values[:, :neighbours].sum(1)


def krum_select(updates: Sequence[ClientUpdate], f: int, m: int) -> list[int]:
    """The positions of the ``m`` lowest Krum scores (ties to the lower client id), in score order."""
    scores = krum_scores(pairwise_sq_distances(updates), f)
    order = sorted(range(len(updates)), key=lambda i: (float(scores[i]), updates[i].cid))
    return order[: max(1, min(m, len(updates)))]


def geometric_median(updates: Sequence[ClientUpdate], iterations: int, smoothing: float) -> dict[str, torch.Tensor]:
    """The weighted geometric median of the updates, argmin_z Σ_k w_k ‖z − Δ_k‖, by smoothed
    Weiszfeld steps from the weighted mean: β_k = w_k / max(ν, ‖z − Δ_k‖), z ← Σ β_k Δ_k / Σ β_k.
    A client's distance is over the elements it holds, and each element's step averages over its
    holders. Stops early when a step moves z by less than 1e-12 of its norm (at least 1e-12)."""
    entries = list(_stacked(updates))
    weights = torch.tensor([u.weight for u in updates], dtype=torch.float64)
    z = {name: weighted_mean_held(values, held, weights) for name, values, held in entries}

    def distances() -> torch.Tensor:
        sq = torch.zeros(len(updates), dtype=torch.float64)
        for name, values, held in entries:
            diff = torch.where(held, values - z[name].unsqueeze(0), torch.zeros((), dtype=torch.float64))
            sq += (diff * diff).reshape(len(updates), -1).sum(1)
        return sq.sqrt()

    dist = distances()
    for _ in range(iterations):
        beta = weights / dist.clamp_min(smoothing)
        new = {name: weighted_mean_held(values, held, beta) for name, values, held in entries}
        step = math.sqrt(sum(float(((new[n] - z[n]) ** 2).sum()) for n in z))
        size = math.sqrt(sum(float((v * v).sum()) for v in new.values()))
        z = new
        if step <= 1e-12 * max(1.0, size):
            break
        dist = distances()
    return z


# -- a round --------------------------------------------------------------------------------------


def screen(updates: Mapping[int, ClientUpdate], rule: RobustRule) -> dict[int, str]:
    """The clients ``norm_bound`` rejects, with the reason (nothing without a bound, or when the
    round's median norm is 0)."""
    if rule.norm_bound is None or not updates:
        return {}
    norms = {cid: u.norm for cid, u in updates.items()}
    median = statistics.median(norms.values())
    if median <= 0:
        return {}
    limit = rule.norm_bound * median
    return {
        cid: f"update norm {norm:.4g} is above aggregation.norm_bound {rule.norm_bound:g} x the round's median update norm {median:.4g}"
        for cid, norm in sorted(norms.items())
        if not norm <= limit
    }


def combine(
    updates: Sequence[ClientUpdate], rule: RobustRule
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The rule's combined update per entry (global-shaped, float64) and where some client (of those
    the rule kept) held each element. ``clip`` is applied first, in place."""
    updates = sorted(updates, key=lambda u: u.cid)
    if rule.clip is not None:
        for u in updates:
            norm = u.norm
            if norm > rule.clip:
                u.scale(rule.clip / norm)
    if rule.rule in ("krum", "multi_krum") and updates:
        f = rule.krum_f(len(updates))
        m = 1 if rule.rule == "krum" else (rule.select if rule.select is not None else len(updates) - f)
        updates = [updates[i] for i in sorted(krum_select(updates, f, m))]
    if rule.rule == "geometric_median" and updates:
        z = geometric_median(updates, rule.iterations, rule.smoothing)
        return z, {name: held.any(0) for name, _, held in _stacked(updates)}
    weights = torch.tensor([u.weight for u in updates], dtype=torch.float64)
    out, covered = {}, {}
    for name, values, held in _stacked(updates):
        if rule.rule == "median":
            out[name] = coordinate_median(values, held)
        elif rule.rule == "trimmed_mean":
            out[name] = trimmed_mean(values, held, rule.trim)
        else:  # mean, and the average of Krum's selection
            out[name] = weighted_mean_held(values, held, weights)
        covered[name] = held.any(0)
    return out, covered


def apply(
    reference: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], covered: Mapping[str, torch.Tensor]
) -> Params:
    """``reference`` moved by ``delta`` where ``covered``; integer entries rounded; dtypes and
    devices follow ``reference``."""
    out: Params = {}
    for name, ref in reference.items():
        if name not in delta:
            out[name] = ref.detach().clone()
            continue
        base = ref.detach().cpu().to(torch.float64)
        value = torch.where(covered[name], base + delta[name], base)
        if not ref.is_floating_point():
            value = torch.round(value)
        out[name] = value.to(dtype=ref.dtype, device=ref.device)
    return out
