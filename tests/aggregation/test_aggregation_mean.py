"""fedhet.aggregation.mean: weighted mean by hand arithmetic, grouping-free merges, buffers."""

import itertools

import pytest
import torch

from fedhet.aggregation.mean import WeightedSum, weighted_mean
from fedhet.core.messages import ClientResult, ClientTask


def test_weighted_mean_two_clients_weights_1_and_3():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[4.0]])}
    b = {"w": torch.tensor([5.0, 10.0]), "b": torch.tensor([[0.0]])}
    out = weighted_mean([a, b], [1, 3])
    # (1*1 + 3*5)/4 = 4, (1*2 + 3*10)/4 = 8, (1*4 + 3*0)/4 = 1
    assert torch.equal(out["w"], torch.tensor([4.0, 8.0]))
    assert torch.equal(out["b"], torch.tensor([[1.0]]))
    assert out["w"].dtype == torch.float32


def test_weighted_mean_three_clients():
    ps = [
        {"x": torch.tensor([0.0, 1.0, -2.0])},
        {"x": torch.tensor([3.0, 1.0, 2.0])},
        {"x": torch.tensor([6.0, 4.0, 0.0])},
    ]
    out = weighted_mean(ps, [2, 1, 1])
    # x0: (0*2 + 3 + 6)/4 = 2.25 ; x1: (2 + 1 + 4)/4 = 1.75 ; x2: (-4 + 2 + 0)/4 = -0.5
    assert torch.equal(out["x"], torch.tensor([2.25, 1.75, -0.5]))


def test_weighted_mean_zero_weight_client_is_ignored():
    out = weighted_mean([{"x": torch.tensor([1.0])}, {"x": torch.tensor([100.0])}], [2, 0])
    assert torch.equal(out["x"], torch.tensor([1.0]))


def test_weighted_mean_rejects_negative_weights_and_bad_lengths():
    p = {"x": torch.tensor([1.0])}
    with pytest.raises(ValueError, match=r"weight -1.* negative; allowed: weights >= 0"):
        weighted_mean([p, p], [1, -1])
    with pytest.raises(ValueError, match="2 parameter sets but 1 weights"):
        weighted_mean([p, p], [1])
    with pytest.raises(ValueError, match="no parameter sets"):
        weighted_mean([], [])


def test_integer_buffers_are_rounded_and_keep_their_dtype():
    a = {"n": torch.tensor([1, 2], dtype=torch.int64)}
    b = {"n": torch.tensor([2, 3], dtype=torch.int64)}
    out = weighted_mean([a, b], [1, 3])
    # (1 + 6)/4 = 1.75 -> 2 ; (2 + 9)/4 = 2.75 -> 3
    assert out["n"].dtype == torch.int64
    assert torch.equal(out["n"], torch.tensor([2, 3]))


def test_uncovered_names_keep_the_reference_value():
    acc = WeightedSum()
    acc.add_params({"w": torch.tensor([2.0])}, 1.0)
    ref = {"w": torch.tensor([0.0]), "z": torch.tensor([7.0, 8.0])}
    out = acc.mean(ref)
    assert torch.equal(out["w"], torch.tensor([2.0]))
    assert torch.equal(out["z"], ref["z"])
    assert out["z"].data_ptr() != ref["z"].data_ptr()  # a copy, not the reference itself
    out["z"][0] = -1.0
    assert ref["z"][0] == 7.0


def test_zero_total_weight_keeps_everything():
    acc = WeightedSum()
    acc.add_params({"w": torch.tensor([5.0])}, 0.0)
    assert torch.equal(acc.mean({"w": torch.tensor([1.5])})["w"], torch.tensor([1.5]))
    assert torch.equal(WeightedSum().mean({"w": torch.tensor([1.5])})["w"], torch.tensor([1.5]))


def _result(params, n):
    return ClientResult(params=params, num_examples=n)


def test_add_uses_example_counts_or_uniform_weights():
    task = ClientTask(round=1, params={})
    ex, un = WeightedSum("examples"), WeightedSum("uniform")
    for cid, (v, n) in enumerate([(1.0, 1), (5.0, 3)]):
        ex.add(cid, task, _result({"x": torch.tensor([v])}, n))
        un.add(cid, task, _result({"x": torch.tensor([v])}, n))
    ref = {"x": torch.tensor([0.0])}
    assert torch.equal(ex.mean(ref)["x"], torch.tensor([4.0]))  # (1 + 15)/4
    assert torch.equal(un.mean(ref)["x"], torch.tensor([3.0]))  # (1 + 5)/2
    assert ex.count == un.count == 2 and ex.total == 4.0 and un.total == 2.0
    with pytest.raises(ValueError, match="weighting: got 'median', allowed: examples, uniform"):
        WeightedSum("median")


def test_merge_of_partial_sums_equals_one_sum_bitwise_for_every_grouping():
    g = torch.Generator().manual_seed(0)
    clients = [({"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}, n) for n in (3, 107, 5, 64)]
    task = ClientTask(round=1, params={})
    ref = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}

    whole = WeightedSum()
    for cid, (p, n) in enumerate(clients):
        whole.add(cid, task, _result(p, n))
    expected = whole.mean(ref)

    ids = list(range(len(clients)))
    for order in itertools.permutations(ids):
        for cut in range(1, len(ids)):
            left, right = WeightedSum(), WeightedSum()
            for cid in order[:cut]:
                left.add(cid, task, _result(*clients[cid]))
            for cid in order[cut:]:
                right.add(cid, task, _result(*clients[cid]))
            merged = left.empty()
            merged.merge(right)
            merged.merge(left)
            got = merged.mean(ref)
            assert merged.count == 4 and merged.total == 3 + 107 + 5 + 64
            for name in ref:
                assert torch.equal(got[name], expected[name]), (order, cut, name)


def test_merge_does_not_alias_the_other_accumulator():
    a, b = WeightedSum(), WeightedSum()
    b.add_params({"x": torch.tensor([1.0])}, 1.0)
    a.merge(b)
    a.add_params({"x": torch.tensor([2.0])}, 1.0)
    assert torch.equal(b.sums["x"], torch.tensor([1.0], dtype=torch.float64))


def test_empty_keeps_the_weighting():
    assert WeightedSum("uniform").empty().weighting == "uniform"


def test_sums_by_hand_whatever_the_order_of_the_names():
    acc = WeightedSum()
    acc.add_params({"a": torch.tensor([1.5, -2.0]), "b": torch.tensor([4.0])}, 2.0)
    # the same names in another order: each is added to its own sum
    acc.add_params({"b": torch.tensor([0.25]), "a": torch.tensor([0.5, 1.0])}, 3.0)
    # a: 2*1.5 + 3*0.5 = 4.5, 2*(-2) + 3*1 = -1 ; b: 2*4 + 3*0.25 = 8.75
    assert torch.equal(acc.sums["a"], torch.tensor([4.5, -1.0], dtype=torch.float64))
    assert torch.equal(acc.sums["b"], torch.tensor([8.75], dtype=torch.float64))
    assert list(acc.sums) == ["a", "b"] and acc.total == 5.0 and acc.count == 2


@pytest.mark.parametrize("with_count", [False, True])
def test_sums_take_the_per_tensor_arithmetic_bit_for_bit(with_count):
    # the flat buffer (one dtype) and the per-tensor sums (an int64 count among float32 values)
    # against adding each tensor on its own, as float64(weight * value) + ... in client order
    g = torch.Generator().manual_seed(3)
    clients = [
        ({"w": torch.randn(5, 7, generator=g), "b": torch.randn(7, generator=g), **({"n": torch.tensor(n)} if with_count else {})}, float(n))
        for n in (3, 11, 1, 250)
    ]
    acc = WeightedSum()
    expected: dict[str, torch.Tensor] = {}
    for params, weight in clients:
        acc.add_params(params, weight)
        for name, value in params.items():
            if name in expected:
                expected[name].add_(value, alpha=weight)
            else:
                expected[name] = value.to(torch.float64).mul_(weight)
    assert (acc._flat is None) == with_count
    for name in expected:
        assert torch.equal(acc.sums[name], expected[name]), name
    other = WeightedSum()
    other.add_params(clients[0][0], 1.0)
    before = {k: v.clone() for k, v in acc.sums.items()}
    acc.merge(other)
    for name in expected:
        assert torch.equal(acc.sums[name], before[name] + other.sums[name]), name


def test_new_and_missing_names_are_summed_one_by_one():
    acc = WeightedSum()
    acc.add_params({"a": torch.tensor([1.0])}, 1.0)
    acc.add_params({"a": torch.tensor([2.0]), "b": torch.tensor([3.0])}, 2.0)  # b is new
    acc.add_params({"b": torch.tensor([1.0])}, 1.0)  # a is missing
    assert torch.equal(acc.sums["a"], torch.tensor([5.0], dtype=torch.float64))
    assert torch.equal(acc.sums["b"], torch.tensor([7.0], dtype=torch.float64))
    other = WeightedSum()
    other.add_params({"c": torch.tensor([1.0])}, 1.0)
    acc.merge(other)
    assert sorted(acc.sums) == ["a", "b", "c"] and torch.equal(acc.sums["c"], torch.tensor([1.0], dtype=torch.float64))


def test_a_float64_value_is_copied_not_scaled_in_place():
    value = torch.tensor([1.0, 2.0], dtype=torch.float64)
    acc = WeightedSum()
    acc.add_params({"x": value}, 3.0)
    assert torch.equal(value, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.equal(acc.sums["x"], torch.tensor([3.0, 6.0], dtype=torch.float64))


def test_the_sums_are_views_of_one_buffer_that_travels_once():
    import pickle

    from fedhet.simulation import wire

    acc = WeightedSum()
    acc.add_params({"w": torch.ones(100, 50), "b": torch.full((50,), 2.0)}, 3.0)
    acc.add_params({"w": torch.ones(100, 50), "b": torch.full((50,), 2.0)}, 1.0)
    assert acc._flat is not None and all(t.untyped_storage().data_ptr() == acc._flat.untyped_storage().data_ptr() for t in acc.sums.values())
    for blob in (wire.dumps(acc), pickle.dumps(acc)):
        assert len(blob) < 1.2 * 5050 * 8  # the float64 buffer once, not also each view
    back = pickle.loads(wire.dumps(acc))
    for got in (back, pickle.loads(pickle.dumps(acc))):
        assert torch.equal(got.sums["w"], torch.full((100, 50), 4.0, dtype=torch.float64))
        assert torch.equal(got.sums["b"], torch.full((50,), 8.0, dtype=torch.float64))
        got.add_params({"w": torch.ones(100, 50), "b": torch.ones(50)}, 1.0)  # still one buffer
        assert got._flat is not None and float(got._flat.sum()) == 5000 * 5.0 + 50 * 9.0
    root = WeightedSum()
    root.absorb(acc)  # the round's root takes the buffer itself
    assert root._flat is not None and acc._flat is None and root.count == 2
    root.merge(back)
    assert float(root.sums["b"][0]) == 8.0 + 9.0


def test_a_value_of_another_shape_is_refused_even_with_as_many_elements():
    acc = WeightedSum()
    acc.add_params({"w": torch.ones(2, 3)}, 1.0)
    with pytest.raises(RuntimeError):
        acc.add_params({"w": torch.ones(3, 2)}, 1.0)  # 6 elements too: never added as if it fit


def test_a_large_model_is_summed_tensor_by_tensor_with_the_same_bits(monkeypatch):
    from fedhet.aggregation import mean

    g = torch.Generator().manual_seed(5)
    updates = [({"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}, float(n)) for n in (7, 2, 30)]
    flat = WeightedSum()
    for params, weight in updates:
        flat.add_params(params, weight)
    monkeypatch.setattr(mean, "FLAT_LIMIT", 34)  # the model has 35 elements: over the limit
    split = WeightedSum()
    for params, weight in updates:
        split.add_params(params, weight)
    assert flat._flat is not None and split._flat is None
    for name in ("w", "b"):
        assert torch.equal(flat.sums[name], split.sums[name])
