"""Robust aggregation rules against hand-computed numbers, with and without coverage (sub-models)."""

from __future__ import annotations

import math

import pytest
import torch

from fedhet.aggregation.mean import GroupedSum, WeightedSum
from fedhet.aggregation.robust import (
    RobustRule,
    combine,
    coordinate_median,
    geometric_median,
    krum_scores,
    make_update,
    pairwise_sq_distances,
    screen,
    trimmed_mean,
)
from fedhet.core.messages import ClientResult, ClientTask
from fedhet.submodel.spec import CoverageSum, Part, SubmodelSpec

T = torch.tensor


def col(*values):
    """One element per client: a (K, 1) tensor."""
    return T([[float(v)] for v in values], dtype=torch.float64)


def ups(*rows, weights=None):
    """Full-size updates from rows of Δ (received 0)."""
    weights = weights or [1.0] * len(rows)
    return [
        make_update(k, w, {"w": T(r, dtype=torch.float32)}, {"w": torch.zeros(len(r))})
        for k, (r, w) in enumerate(zip(rows, weights))
    ]


def test_coordinate_median_odd_even_and_coverage():
    everyone = torch.ones(3, 1, dtype=torch.bool)
    assert coordinate_median(col(1, 5, 2), everyone).item() == 2.0
    assert coordinate_median(col(1, 5, 2, 10), torch.ones(4, 1, dtype=torch.bool)).item() == 3.5  # (2 + 5) / 2
    # element 0 held by all four, element 1 by clients 0 and 3 only, element 2 by nobody
    values = T([[1.0, 7.0, 9.0], [5.0, -100.0, 9.0], [2.0, 100.0, 9.0], [10.0, 3.0, 9.0]], dtype=torch.float64)
    held = T([[1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    assert coordinate_median(values, held).tolist() == [3.5, 5.0, 0.0]


def test_trimmed_mean_cuts_per_element_count():
    everyone = torch.ones(5, 1, dtype=torch.bool)
    # floor(0.2 * 5) = 1 cut from each end: mean(2, 3, 4)
    assert trimmed_mean(col(100, 2, 1, 3, 4), everyone, 0.2).item() == 3.0
    assert trimmed_mean(col(100, 2, 1, 3, 4), everyone, 0.0).item() == 22.0
    # element 1 has 3 holders: floor(0.6) = 0 cut, the plain mean of its holders
    values = T([[100.0, 1.0], [2.0, 2.0], [1.0, 6.0], [3.0, 50.0], [4.0, 50.0]], dtype=torch.float64)
    held = T([[1, 1], [1, 1], [1, 1], [1, 0], [1, 0]], dtype=torch.bool)
    assert trimmed_mean(values, held, 0.2).tolist() == [3.0, 3.0]


def test_krum_scores_and_choice():
    # 1-D updates 0, 1, 3, 100; f = 0 -> each scored by its n - f - 2 = 2 nearest others
    d = pairwise_sq_distances(ups([0.0], [1.0], [3.0], [100.0]))
    assert d[0, 1].item() == 1.0 and d[2, 3].item() == 97.0**2
    assert krum_scores(d, 0).tolist() == [1 + 9, 1 + 4, 4 + 9, 97.0**2 + 99.0**2]
    krum, _ = combine(ups([0.0], [1.0], [3.0], [100.0]), RobustRule(rule="krum", byzantine=0))
    assert krum["w"].tolist() == [1.0]
    multi, _ = combine(ups([0.0], [1.0], [3.0], [100.0]), RobustRule(rule="multi_krum", byzantine=0, select=2))
    assert multi["w"].tolist() == [0.5]
    # default m = n - f: with f = 1 (n = 4 tolerates floor(1 / 2) = 0; byzantine given) the 3 best
    three, _ = combine(ups([0.0], [1.0], [3.0], [100.0]), RobustRule(rule="multi_krum", byzantine=1))
    assert three["w"].tolist() == [pytest.approx(4.0 / 3.0)]


def test_krum_distance_with_coverage_is_over_shared_elements():
    # client 0 holds element 0 only; distances are mean squared differences over what both hold
    shapes = {"w": (2,)}
    part_small, part_full = Part((slice(0, 1),)), Part((None,))
    a = make_update(0, 1.0, {"w": T([2.0])}, {"w": T([0.0])}, shapes, {"w": part_small})
    b = make_update(1, 1.0, {"w": T([0.0, 4.0])}, {"w": T([0.0, 0.0])}, shapes, {"w": part_full})
    c = make_update(2, 1.0, {"w": T([1.0, 0.0])}, {"w": T([0.0, 0.0])}, shapes, {"w": part_full})
    d = pairwise_sq_distances([a, b, c])
    assert d[0, 1].item() == 4.0  # (2 - 0)² over 1 shared element
    assert d[0, 2].item() == 1.0
    assert d[1, 2].item() == (1.0 + 16.0) / 2


def test_geometric_median_is_the_1d_median_and_resists_an_outlier():
    z = geometric_median(ups([0.0], [1.0], [10.0]), iterations=200, smoothing=1e-9)
    assert z["w"].item() == pytest.approx(1.0, abs=1e-4)
    # the corners of a square and one point far out on its diagonal: the unit vectors towards the
    # points cancel at (a, a) with 6a² - 12a + 4 = 0, a = 1 + 1/sqrt(3), however far the fifth point is
    z = geometric_median(
        ups([0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1e6, 1e6]), iterations=500, smoothing=1e-9
    )
    a = 1 + 1 / math.sqrt(3)
    assert z["w"].tolist() == [pytest.approx(a, abs=1e-6), pytest.approx(a, abs=1e-6)]
    # weights: a client of weight 3 pulls the 1-D median onto itself
    z = geometric_median(ups([0.0], [1.0], [10.0], weights=[1.0, 1.0, 3.0]), iterations=200, smoothing=1e-9)
    assert z["w"].item() == pytest.approx(10.0, abs=1e-4)


def test_clip_and_norm_bound():
    clipped, _ = combine(ups([3.0, 4.0]), RobustRule(clip=1.0))
    assert clipped["w"].tolist() == [pytest.approx(0.6), pytest.approx(0.8)]
    untouched, _ = combine(ups([3.0, 4.0]), RobustRule(clip=10.0))
    assert untouched["w"].tolist() == [3.0, 4.0]
    updates = {u.cid: u for u in ups([1.0], [1.0], [2.0], [100.0])}
    rejected = screen(updates, RobustRule(norm_bound=10.0))  # median norm 1.5, limit 15
    assert list(rejected) == [3] and "1.5" in rejected[3] and "norm_bound 10" in rejected[3]
    assert screen(updates, RobustRule(norm_bound=100.0)) == {}
    assert screen(updates, RobustRule(rule="median")) == {}


def _task(values, **extras):
    return ClientTask(round=1, params={"w": T(values)}, extras=extras)


def _result(values, n=1):
    return ClientResult(params={"w": T(values)}, num_examples=n)


def test_weighted_sum_with_a_rule_moves_the_reference_by_the_rule():
    acc = WeightedSum("examples")
    assert acc.use_rule(RobustRule(rule="median"))
    for cid, (v, n) in enumerate([(1.0, 10), (2.0, 10), (1e30, 1000)]):
        acc.add(cid, _task([0.5]), _result([v], n))
    # Δ = 0.5, 1.5, 1e30 - 0.5: the median is 1.5, added to the reference 0.5
    assert acc.mean({"w": T([0.5])})["w"].tolist() == [2.0]
    # a worker's accumulator merges: the same as adding everything to one
    left, right = WeightedSum("examples", RobustRule(rule="median")), WeightedSum("examples", RobustRule(rule="median"))
    left.add(0, _task([0.5]), _result([1.0], 10))
    right.add(1, _task([0.5]), _result([2.0], 10))
    right.add(2, _task([0.5]), _result([1e30], 1000))
    left.merge(right)
    assert left.mean({"w": T([0.5])})["w"].tolist() == [2.0] and left.count == 3 and left.total == 1020.0
    left.reject([2])
    assert left.count == 2 and left.total == 20.0
    assert left.mean({"w": T([0.5])})["w"].tolist() == [1.5]  # median of Δ 0.5, 1.5 is 1.0


def test_an_inactive_rule_keeps_the_streaming_mean():
    acc = WeightedSum("examples")
    acc.use_rule(RobustRule())
    acc.add(0, _task([0.0]), _result([1.0], 1))
    acc.add(1, _task([0.0]), _result([4.0], 3))
    assert acc.kept == {} and acc.mean({"w": T([0.0])})["w"].tolist() == [3.25]


class OneSpec:
    """spec_of for the coverage tests: each task's 'size' extra is how many leading elements of a
    4-element vector the client holds."""

    def __call__(self, task):
        k = int(task.extras["size"])
        return SubmodelSpec({"w": Part((slice(0, k),))}, {"w": (4,)})


def test_coverage_sum_median_per_element_over_holders():
    acc = CoverageSum(OneSpec(), "uniform")
    assert acc.use_rule(RobustRule(rule="median"))
    ref = T([0.0, 0.0, 0.0, 0.0])
    # clients of sizes 2, 4, 4, 4 (received the prefix of the zero global)
    acc.add(0, ClientTask(1, {"w": ref[:2]}, extras={"size": T(2)}), _result([100.0, 100.0]))
    acc.add(1, ClientTask(1, {"w": ref}, extras={"size": T(4)}), _result([1.0, 2.0, 3.0, 4.0]))
    acc.add(2, ClientTask(1, {"w": ref}, extras={"size": T(4)}), _result([3.0, 4.0, 5.0, 6.0]))
    acc.add(3, ClientTask(1, {"w": ref}, extras={"size": T(4)}), _result([5.0, 6.0, 7.0, -8.0]))
    out = acc.mean({"w": T([0.0, 0.0, 0.0, 0.0])})["w"]
    # elements 0-1: median of 4 values (100, 1, 3, 5 -> 4; 100, 2, 4, 6 -> 5); 2-3: of 3 values
    assert out.tolist() == [4.0, 5.0, 5.0, 4.0]
    assert acc.weights["w"].tolist() == [4.0, 4.0, 3.0, 3.0]
    acc.reject([0])
    assert acc.weights["w"].tolist() == [3.0, 3.0, 3.0, 3.0] and acc.count == 3
    assert acc.mean({"w": T([0.0, 0.0, 0.0, 0.0])})["w"].tolist() == [3.0, 4.0, 5.0, 4.0]
    assert [c.tolist() for c in acc.covered().values()] == [[True] * 4]


def test_coverage_sum_trimmed_mean_and_uncovered_elements_keep_the_reference():
    acc = CoverageSum(OneSpec(), "uniform", rule=RobustRule(rule="trimmed_mean", trim=0.25))
    ref = T([10.0, 10.0, 10.0, 10.0])
    for cid, values in enumerate([[11.0], [12.0], [13.0], [1000.0]]):
        acc.add(cid, ClientTask(1, {"w": ref[:1]}, extras={"size": T(1)}), _result(values))
    out = acc.mean({"w": ref})["w"]
    # element 0: 4 holders, floor(0.25 * 4) = 1 cut each end: 10 + mean(2, 3); the rest untouched
    assert out.tolist() == [12.5, 10.0, 10.0, 10.0]


def test_grouped_sum_applies_the_rule_within_each_group():
    acc = GroupedSum(lambda task, result: int(task.extras["g"]), "uniform")
    assert acc.use_rule(RobustRule(rule="median"))
    for cid, (g, v) in enumerate([(0, 1.0), (0, 2.0), (0, 9.0), (1, 5.0)]):
        acc.add(cid, ClientTask(1, {"w": T([0.0])}, extras={"g": T(g)}), _result([v]))
    assert acc.groups[0].mean({"w": T([0.0])})["w"].tolist() == [2.0]
    assert sorted(acc.kept_updates()) == [0, 1, 2, 3]
    acc.reject([2])
    assert acc.count == 3 and acc.groups[0].mean({"w": T([0.0])})["w"].tolist() == [1.5]


def test_rule_options_are_checked():
    with pytest.raises(ValueError, match="aggregation.rule: got 'mode'"):
        RobustRule(rule="mode")
    with pytest.raises(ValueError, match="aggregation.trim: got 0.5"):
        RobustRule(rule="trimmed_mean", trim=0.5)
    with pytest.raises(ValueError, match="aggregation.norm_bound: got 0"):
        RobustRule(norm_bound=0)
    assert not RobustRule().active and RobustRule(clip=1.0).active and RobustRule(rule="krum").active
    assert RobustRule().krum_f(10) == 3 and math.isclose(RobustRule(byzantine=2).krum_f(10), 2)
