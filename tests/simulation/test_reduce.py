"""The canonical tree: its shape is fixed by the number of clients alone, so any split of the clients
into contiguous shares gives the same merges in the same order (checked with an accumulator that
records its merges as an expression, and with float64 sums that a left fold would round otherwise),
and folding it leaf by leaf holds one partial sum per level."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedhet.aggregation.base import Accumulator
from fedhet.aggregation.mean import WeightedSum
from fedhet.core.messages import ClientResult, ClientTask
from fedhet.simulation.reduce import FANOUT, BlockFolder, combine, share_blocks


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


def _fold(
    shares: list[range], n: int, add=lambda acc, i: acc.merge(Expression(str(i))), template=None, fanout: int = FANOUT  # noqa: ANN001
) -> Accumulator | None:
    """Leaf ``i`` is ``add(acc, i)``, each share folded by its own ``BlockFolder``, then combined."""
    blocks = {}
    for share in shares:
        folder = BlockFolder(share.start, template or Expression(), fanout)
        for i in share:
            folder.push(lambda acc, i=i: add(acc, i))
        assert list(folder.blocks()) == share_blocks(share.start, share.stop, fanout)
        blocks.update(folder.blocks())
    return combine(blocks, n, fanout)


def test_share_blocks_by_hand() -> None:
    assert FANOUT == 4
    assert share_blocks(0, 7) == [(0, 4), (4, 3)]
    assert share_blocks(2, 9) == [(2, 1), (3, 1), (4, 4), (8, 1)]
    # a share starting inside a node: the children after its start stay separate blocks at each level
    assert share_blocks(50, 100) == [(50, 1), (51, 1), (52, 4), (56, 4), (60, 4), (64, 32), (96, 4)]
    assert share_blocks(0, 50) == [(0, 48), (48, 2)]
    assert share_blocks(0, 100) == [(0, 64), (64, 32), (96, 4)]
    assert share_blocks(5, 5) == []
    assert share_blocks(0, 16) == [(0, 16)]
    # fan-out 2 is the binary tree: blocks aligned to their size
    assert share_blocks(0, 7, 2) == [(0, 4), (4, 2), (6, 1)]
    assert share_blocks(3, 7, 2) == [(3, 1), (4, 2), (6, 1)]
    assert share_blocks(1, 8, 2) == [(1, 1), (2, 2), (4, 4)]
    with pytest.raises(ValueError, match="0 <= lo <= hi"):
        share_blocks(3, 2)
    with pytest.raises(ValueError, match="fanout is 1; allowed: >= 2"):
        share_blocks(0, 3, 1)


def test_the_tree_over_seven_clients_by_hand() -> None:
    root = _fold([range(7)], 7)
    assert isinstance(root, Expression)
    assert root.text == "((((0+1)+2)+3)+((4+5)+6))"
    assert _fold([range(7)], 7, fanout=2).text == "(((0+1)+(2+3))+((4+5)+6))"  # type: ignore[union-attr]
    assert _fold([range(18)], 18).text == (  # type: ignore[union-attr]
        "(((((((0+1)+2)+3)+(((4+5)+6)+7))+(((8+9)+10)+11))+(((12+13)+14)+15))+(16+17))"
    )
    assert _fold([range(1)], 1).text == "0"  # type: ignore[union-attr]
    assert _fold([], 0) is None


@pytest.mark.parametrize(("n", "fanout"), [(1, 4), (2, 4), (3, 4), (5, 4), (8, 4), (13, 4), (18, 4), (21, 4), (13, 2), (11, 3)])
def test_every_split_into_contiguous_shares_gives_the_same_tree(n: int, fanout: int) -> None:
    whole = _fold([range(n)], n, fanout=fanout).text  # type: ignore[union-attr]
    for cuts in itertools.chain.from_iterable(itertools.combinations(range(1, n), k) for k in range(min(n, 4))):
        bounds = [0, *cuts, n]
        shares = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        assert _fold(shares, n, fanout=fanout).text == whole, shares  # type: ignore[union-attr]


class Counted(Expression):
    """Counts the accumulators alive (made by ``empty`` and not yet merged away)."""

    live = peak = 0

    def empty(self) -> Accumulator:
        Counted.live += 1
        Counted.peak = max(Counted.peak, Counted.live)
        return Counted()

    def merge(self, other: Accumulator) -> None:
        Counted.live -= 1
        super().merge(other)


@pytest.mark.parametrize(("n", "held"), [(1, 1), (4, 1), (5, 2), (16, 2), (20, 2), (64, 3), (100, 4), (256, 4), (257, 4), (2000, 6)])
def test_folding_a_whole_round_holds_one_partial_sum_per_level(n: int, held: int) -> None:
    """At most ceil(log_4 n) float64 copies of the model (a binary tree holds up to ceil(log_2 n))."""
    Counted.live = Counted.peak = 0
    folder = BlockFolder(0, Counted())
    for _ in range(n):
        folder.push(lambda acc: None)
    assert Counted.peak == held
    assert Counted.live == len(folder.blocks())


def test_a_failed_client_is_an_empty_leaf_that_shifts_nothing() -> None:
    root = _fold([range(3), range(3, 5)], 5, add=lambda acc, i: i == 2 or acc.merge(Expression(str(i))))
    assert root.text == "(((0+1)+3)+4)"  # type: ignore[union-attr]


def test_missing_or_overlapping_blocks_are_an_error() -> None:
    with pytest.raises(ValueError, match="leaf 2 of 4 is in no block"):
        combine({(0, 2): Expression("x"), (3, 1): Expression("y")}, 4)
    with pytest.raises(ValueError, match=r"blocks \[\(2, 1\)\] of 2 overlap others"):
        combine({(0, 4): Expression("x"), (2, 1): Expression("y")}, 4)
    with pytest.raises(ValueError, match="1 blocks for 0 leaves"):
        combine({(0, 1): Expression("x")}, 0)


def test_float64_sums_are_the_same_bits_on_any_split() -> None:
    """Values whose float64 sum depends on the grouping: the tree fixes it."""
    values = [1e16, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, -1e16]  # a left fold loses both 1.0s, the tree 2.0
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
    assert results == {2.0} and left_fold == 0.0  # the grouping does matter for these values


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
