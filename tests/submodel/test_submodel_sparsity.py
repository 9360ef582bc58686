"""Sparse sub-models: ERK densities, random masks, the cosine drop schedule and prune-and-regrow,
against hand-computed numbers; averaging by mask counts through mask_spec + CoverageSum."""

from __future__ import annotations

import math

import pytest
import torch

from fedhet.submodel.sparsity import drop_fraction, erk_densities, prune_and_regrow, random_masks
from fedhet.submodel.spec import CoverageSum, mask_spec


def test_erk_densities_by_hand():
    # w: 10x10 (p = 20/100 = 0.2, n = 100); v: 10x1 (p = 11/10 = 1.1, n = 10); total n = 110
    shapes = {"w": (10, 10), "v": (10, 1)}
    # density 0.5: ε = 55 / (0.2·100 + 1.1·10) = 55/31; v would get 1.1·55/31 = 1.95 > 1 -> dense
    # then ε = (0.5·100 − 0.5·10) / (0.2·100) = 45/20 = 2.25, w gets 0.2·2.25 = 0.45
    d = erk_densities(shapes, 0.5)
    assert d["v"] == 1.0 and d["w"] == pytest.approx(0.45)
    assert (d["w"] * 100 + d["v"] * 10) / 110 == pytest.approx(0.5)
    # density 0.1: ε = 11/31; v: 1.1·11/31 = 0.39 <= 1 -> both sparse
    d = erk_densities(shapes, 0.1)
    assert d["w"] == pytest.approx(0.2 * 11 / 31) and d["v"] == pytest.approx(1.1 * 11 / 31)
    assert erk_densities(shapes, 1.0) == {"w": pytest.approx(1.0), "v": 1.0}
    with pytest.raises(ValueError, match="density"):
        erk_densities(shapes, 0.0)


def test_erk_gives_small_tensors_more_density_and_keeps_the_total():
    shapes = {"conv": (64, 32, 3, 3), "fc": (10, 512), "bias": (64,), "norm": (64,)}
    d = erk_densities(shapes, 0.3)
    assert d["bias"] == d["norm"] == 1.0 and d["fc"] > d["conv"]
    total = sum(math.prod(s) for s in shapes.values())
    assert sum(d[n] * math.prod(s) for n, s in shapes.items()) / total == pytest.approx(0.3)


def test_random_masks_keep_the_exact_count_and_depend_on_the_generator():
    shapes = {"a": (4, 5), "b": (7,)}
    m = random_masks(shapes, {"a": 0.5, "b": 0.3}, torch.Generator().manual_seed(0))
    assert int(m["a"].sum()) == 10 and int(m["b"].sum()) == 2 and m["a"].shape == (4, 5)
    again = random_masks(shapes, {"a": 0.5, "b": 0.3}, torch.Generator().manual_seed(0))
    other = random_masks(shapes, {"a": 0.5, "b": 0.3}, torch.Generator().manual_seed(1))
    assert torch.equal(m["a"], again["a"]) and not torch.equal(m["a"], other["a"])


def test_drop_fraction_is_cosine_annealed():
    assert drop_fraction(0, 100) == pytest.approx(0.5)
    assert drop_fraction(50, 100) == pytest.approx(0.25)
    assert drop_fraction(100, 100) == pytest.approx(0.0)
    assert drop_fraction(25, 100, anneal=1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_prune_and_regrow_by_hand():
    w = torch.tensor([0.5, -0.1, 0.0, 0.3, 0.0, 0.0, -0.9, 0.0])
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)
    # nnz 4, fraction 0.5 -> k = 2: drop the smallest |w| among the active (positions 1: 0.1, 3: 0.3),
    # then regrow the 2 positions with the largest |grad| among those inactive AFTER the drop, as the
    # authors' code does: 1 and 3 (|grad| 9) come straight back
    grad = torch.tensor([9.0, 9.0, 0.2, 9.0, -0.7, 0.1, 9.0, 0.4])
    new = prune_and_regrow({"w": w}, {"w": mask}, 0.5, scores={"w": grad})["w"]
    assert new.tolist() == [True, True, False, True, False, False, True, False]
    # with smaller gradients there: inactive after the drop are 1, 2, 3, 4, 5, 7 with |grad| 0.5, 0.2,
    # 0.6, 0.7, 0.1, 0.4 -> regrow 4 and 3
    grad = torch.tensor([9.0, 0.5, 0.2, 0.6, -0.7, 0.1, 9.0, 0.4])
    new = prune_and_regrow({"w": w}, {"w": mask}, 0.5, scores={"w": grad})["w"]
    assert new.tolist() == [True, False, False, True, True, False, True, False]
    # k = ceil(0.3·4) = 2 as well; random regrowth picks 2 of the 6 positions inactive after the drop
    rnd = prune_and_regrow({"w": w}, {"w": mask}, 0.3, generator=torch.Generator().manual_seed(0))["w"]
    assert int(rnd.sum()) == 4 and rnd[0] and rnd[6]
    assert torch.equal(prune_and_regrow({"w": w}, {"w": mask}, 0.0, scores={"w": grad})["w"], mask)
    with pytest.raises(ValueError, match="scores"):
        prune_and_regrow({"w": w}, {"w": mask}, 0.5)


def test_the_number_dropped_is_ceil_of_the_fraction_without_a_cap():
    # nnz 4 of 5, fraction 0.6 -> k = ceil(2.4) = 3, though only 1 position was inactive before the drop:
    # drop 1 (0.1), 2 (0.2), 3 (0.3); regrow the 3 largest |score| of 1, 2, 3, 4 -> 4, 3, 2
    w = torch.tensor([0.5, -0.1, 0.2, 0.3, 0.0])
    mask = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool)
    new = prune_and_regrow({"w": w}, {"w": mask}, 0.6, scores={"w": torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])})["w"]
    assert new.tolist() == [True, False, True, True, True]
    # fraction 1: every active weight is dropped, and as many are regrown among all positions
    new = prune_and_regrow({"w": w}, {"w": mask}, 1.0, scores={"w": torch.tensor([5.0, 0.0, 1.0, 2.0, 3.0])})["w"]
    assert new.tolist() == [True, False, True, True, True]


def test_mask_count_average_through_coverage_sum():
    """DisPFL's aggregation Σ m_j ⊙ w_j / Σ m_j (0 where no model holds a position)."""
    shapes = {"w": (4,)}
    masks = [torch.tensor([1, 1, 0, 0], dtype=torch.bool), torch.tensor([1, 0, 1, 0], dtype=torch.bool)]
    weights = [{"w": torch.tensor([2.0, 4.0, 0.0, 0.0])}, {"w": torch.tensor([6.0, 0.0, 8.0, 0.0])}]
    acc = CoverageSum(spec_of=None)
    for m, w in zip(masks, weights):
        acc.add_spec(mask_spec(shapes, {"w": m}), w, 1.0)
    assert acc.mean({"w": torch.zeros(4)})["w"].tolist() == [4.0, 4.0, 8.0, 0.0]


def test_pack_bits_by_hand_and_back():
    from fedhet.submodel.sparsity import count_bits, pack_bits, unpack_bits

    mask = torch.tensor([True, False, True, True, False, False, False, False, True])
    bits = pack_bits(mask)
    assert bits.tolist() == [0b10110000, 0b10000000]  # row-major, most significant bit first
    assert count_bits(bits) == 4
    assert torch.equal(unpack_bits(bits, (9,)), mask)
    assert torch.equal(unpack_bits(pack_bits(mask.reshape(3, 3)), (3, 3)), mask.reshape(3, 3))
    with pytest.raises(ValueError, match="expected 2 uint8 for shape"):
        unpack_bits(bits[:1], (9,))


def test_a_sparse_message_carries_kept_values_and_a_bitmap_and_costs_what_sparse_nbytes_says():
    from fedhet.core.types import params_nbytes, sparse_nbytes
    from fedhet.submodel.sparsity import pack_sparse, unpack_sparse

    w = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])
    m = torch.tensor([[True, False, False], [False, True, True]])
    bias = torch.tensor([0.5, 0.25])
    msg = pack_sparse({"w": w, "b": bias}, {"w": m})
    assert msg["w"].tolist() == [1.0, 5.0, -6.0] and msg["b"] is not None and torch.equal(msg["b"], bias)
    # 3 float32 values + 1 bitmap byte for the 6 positions + the dense 2-value bias
    assert params_nbytes(msg) == 3 * 4 + 1 + 2 * 4 == sparse_nbytes({"w": w, "b": bias}, {"w": m})
    dense, masks = unpack_sparse(msg, {"w": (2, 3), "b": (2,)})
    assert torch.equal(dense["w"], w * m) and torch.equal(masks["w"], m) and set(masks) == {"w"}
    with pytest.raises(ValueError, match="missing"):
        unpack_sparse(msg, {"w": (2, 3), "b": (2,), "c": (1,)})
    with pytest.raises(ValueError, match="carries 2 values for 3 kept"):
        unpack_sparse({**msg, "w": msg["w"][:2]}, {"w": (2, 3), "b": (2,)})
