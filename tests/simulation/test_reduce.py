"""The canonical tree: its shape is fixed by the number of clients alone, so any split of the clients
into contiguous shares gives the same merges in the same order (checked with an accumulator that
records its merges as an expression, and with float64 sums that a left fold would round otherwise)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedhet.aggregation.base import Accumulator
from fedhet.aggregation.mean import WeightedSum
from fedhet.core.messages import ClientResult, ClientTask
from fedhet.simulation.reduce import BlockFolder, aligned_blocks, combine


class Expression(Accumulator):
    """Records how it was built: a leaf is its client id, a merge is ``(left+right)``."""

    def __init__(self, text: str = "") -> None:
        self.text = text

    def add(self, cid: int, task: ClientTask, result: ClientResult) -> None:
        assert not self.text
        self.text = str(cid)

    def merge(self, other: Accumulator) -> None:
        assert isinstance(other, Expression)
        if not other.text:
            return
        self.text = other.text if not self.text else f"({self.text}+{other.text})"


def _fold(shares: list[range], n: int, add=lambda acc, i: acc.merge(Expression(str(i))), template=None) -> Accumulator | None:  # noqa: ANN001
    """Leaf ``i`` is ``add(acc, i)``, each share folded by its own ``BlockFolder``, then combined."""
    blocks = {}
    for share in shares:
        folder = BlockFolder(share.start, template or Expression())
        for i in share:
            folder.push(lambda acc, i=i: add(acc, i))
        assert set(folder.blocks()) == set(aligned_blocks(share.start, share.stop))
        blocks.update(folder.blocks())
    return combine(blocks, n)


def test_aligned_blocks_by_hand() -> None:
    assert aligned_blocks(0, 7) == [(0, 4), (4, 2), (6, 1)]
    assert aligned_blocks(3, 7) == [(3, 1), (4, 2), (6, 1)]
    assert aligned_blocks(1, 8) == [(1, 1), (2, 2), (4, 4)]
    assert aligned_blocks(5, 5) == []
    assert aligned_blocks(0, 16) == [(0, 16)]
    with pytest.raises(ValueError, match="0 <= lo <= hi"):
        aligned_blocks(3, 2)


def test_the_tree_over_seven_clients_by_hand() -> None:
    root = _fold([range(7)], 7)
    assert isinstance(root, Expression)
    assert root.text == "(((0+1)+(2+3))+((4+5)+6))"
    assert _fold([range(1)], 1).text == "0"  # type: ignore[union-attr]
    assert _fold([], 0) is None


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_every_split_into_contiguous_shares_gives_the_same_tree(n: int) -> None:
    whole = _fold([range(n)], n).text  # type: ignore[union-attr]
    for cuts in itertools.chain.from_iterable(itertools.combinations(range(1, n), k) for k in range(min(n, 4))):
        bounds = [0, *cuts, n]
        shares = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        assert _fold(shares, n).text == whole, shares  # type: ignore[union-attr]


def test_a_failed_client_is_an_empty_leaf_that_shifts_nothing() -> None:
    root = _fold([range(3), range(3, 5)], 5, add=lambda acc, i: i == 2 or acc.merge(Expression(str(i))))
    assert root.text == "(((0+1)+3)+4)"  # type: ignore[union-attr]


def test_missing_blocks_are_an_error() -> None:
    with pytest.raises(ValueError, match="leaf 2 of 4 is in no block"):
        combine({(0, 2): Expression("x"), (3, 1): Expression("y")}, 4)


def test_float64_sums_are_the_same_bits_on_any_split() -> None:
    """Values whose float64 sum depends on the grouping: the tree fixes it."""
    values = [1e16, 1.0, -1e16, 1.0, 3.0, 1e-3, 2.5e15, -7.0, 0.1]
    n = len(values)

    def add(acc: WeightedSum, i: int) -> None:
        acc.add_params({"w": torch.tensor([values[i]], dtype=torch.float64)}, 1.0)

    results = set()
    for cuts in [(), (1,), (4,), (2, 7), (1, 3, 5, 8)]:
        bounds = [0, *cuts, n]
        root = _fold([range(a, b) for a, b in zip(bounds, bounds[1:])], n, add=add, template=WeightedSum("uniform"))
        results.add(float(root.sums["w"][0]))  # type: ignore[union-attr]
    assert len(results) == 1
    left_fold = 0.0
    for v in values:
        left_fold += v
    assert results != {left_fold}  # the grouping does matter for these values


def test_combined_blocks_are_freed_without_the_garbage_collector() -> None:
    """Each block is a float64 copy of the model: once combined, the ones merged away must go at once."""
    import gc
    import weakref

    blocks = {(0, 4): WeightedSum(), (4, 2): WeightedSum(), (6, 1): WeightedSum()}
    for acc in blocks.values():
        acc.add_params({"w": torch.ones(3)}, 1.0)
    refs = [weakref.ref(a) for a in blocks.values()]
    gc.disable()
    try:
        root = combine(blocks, 7)
        del blocks, acc
        assert refs[0]() is root and refs[1]() is None and refs[2]() is None
    finally:
        gc.enable()


def test_absorb_gives_merges_bits_and_takes_the_tensors_over() -> None:
    other = WeightedSum()
    other.add_params({"w": torch.tensor([0.1, 0.2], dtype=torch.float32)}, 3.0)
    other.add_params({"w": torch.tensor([0.3, 0.7], dtype=torch.float32)}, 5.0)
    merged, absorbed = WeightedSum(), WeightedSum()
    merged.merge(other)
    held = other.sums["w"]
    absorbed.absorb(other)
    assert absorbed.sums["w"] is held and other.sums == {}
    assert torch.equal(absorbed.sums["w"], merged.sums["w"]) and (absorbed.total, absorbed.count) == (merged.total, merged.count) == (8.0, 2)
    # into a non-empty accumulator it merges
    more = WeightedSum()
    more.add_params({"w": torch.tensor([1.0, 1.0])}, 1.0)
    more.absorb(merged)
    assert torch.equal(more.sums["w"], torch.tensor([1.0, 1.0], dtype=torch.float64) + merged.sums["w"]) and more.count == 3
