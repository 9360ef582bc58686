"""The canonical grouping of a round's partial sums: the same bits on any number of workers.

Float64 addition is not associative, so a round's aggregate must not depend on which worker ran
which client. Every executor therefore folds the round's clients in one fixed shape that depends
only on the number of clients ``n``: the k-th client in client-id order is leaf ``k`` of an
implicit tree of fan-out ``FANOUT``. A node of size ``FANOUT**l`` starts at a multiple of its size,
and its value is the left fold of its children, ``((c0 + c1) + c2) + c3`` (``left.merge(right)``);
children that start at or after ``n`` are absent. A failed client is an empty leaf, so it does not
shift the others.

Folded leaf by leaf (``BlockFolder``), the tree holds one partial sum per level: the running fold of
the node being filled, ``ceil(log_4 n)`` of them at most (4 for 100 clients, against 6 for a binary
tree), each a float64 copy of the model. A leaf that is not the first child of its node is added
straight into the node's running fold instead of into a fresh accumulator that would then be merged:
the same bits, by the accumulator contract (adding a client equals merging in an empty accumulator
holding only that client).

A worker that runs a contiguous share ``[lo, hi)`` of the leaves returns blocks that tile it
(``share_blocks``): a block ``(start, length)`` is the left fold of the first ``length`` leaves' worth
of children of the node that starts at ``start``, so the driver can go on folding where the share
stopped. Children of a node whose fold began before ``lo`` cannot be folded into each other (the fold
must begin with the earlier ones), so they stay separate blocks: at most ``FANOUT - 1`` per level at
a share's start, one per level at its end. The driver combines every worker's blocks with
``combine``. Sequential, multi-process, Ray and Flower executors all go through these two functions,
so they give the same bits whatever the number of workers and wherever the share boundaries fall.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fedhet.aggregation.base import Accumulator

__all__ = ["FANOUT", "BlockFolder", "combine", "share_blocks"]

FANOUT = 4

Block = tuple[int, int]  # (first leaf, number of leaves)


class _Open:
    """A node being folded: ``acc`` holds the left fold of its children covering ``[start,
    start + span)``. ``size`` is the node's size; a node that may take no more children (a child of
    a node whose fold began in an earlier share) is entered with ``size == span``."""

    __slots__ = ("start", "size", "span", "acc")

    def __init__(self, start: int, size: int, span: int, acc: Accumulator) -> None:
        self.start, self.size, self.span, self.acc = start, size, span, acc


class BlockFolder:
    """Folds the leaves of ``[lo, hi)``, pushed in order, into ``share_blocks(lo, hi)``.

    A stack of open nodes, innermost last: a finished node is merged into its parent's running
    fold when that fold is the stack's top and has reached it (else it becomes its parent's fold,
    when it is the first child, or a block of its own), and a parent that is then full is finished
    in turn."""

    def __init__(self, lo: int, template: Accumulator, fanout: int = FANOUT) -> None:
        if fanout < 2:
            raise ValueError(f"BlockFolder: fanout is {fanout}; allowed: >= 2")
        self.next = lo
        self.template = template
        self.fanout = fanout
        self._stack: list[_Open] = []

    def push(self, add: Callable[[Accumulator], None]) -> None:
        """The next leaf: ``add(acc)`` puts its client into ``acc`` (or nothing, for a client that
        failed)."""
        k = self.next
        self.next += 1
        top = self._stack[-1] if self._stack else None
        if k % self.fanout and top is not None and top.size == self.fanout and top.start + top.span == k:
            add(top.acc)  # a later leaf of the node being folded
            top.span += 1
            if top.span == top.size:
                self._stack.pop()
                self._finished(top.start, top.size, top.acc)
            return
        node = self.template.empty()
        add(node)
        self._finished(k, 1, node)

    def _finished(self, start: int, size: int, acc: Accumulator) -> None:
        while True:
            parent = size * self.fanout
            first = start - start % parent
            if first == start:  # the first child starts its parent's fold
                self._stack.append(_Open(start, parent, size, acc))
                return
            top = self._stack[-1] if self._stack else None
            if top is None or top.start != first or top.size != parent or top.start + top.span != start:
                self._stack.append(_Open(start, size, size, acc))  # its parent's fold began before this share
                return
            top.acc.merge(acc)
            top.span += size
            if top.span < parent:
                return
            self._stack.pop()
            start, size, acc = first, parent, top.acc

    def blocks(self) -> dict[Block, Accumulator]:
        """The share's blocks; call after the last leaf of the range was pushed."""
        return {(node.start, node.span): node.acc for node in self._stack}


class _Nothing(Accumulator):
    """An accumulator that holds nothing, to trace the shape of a fold."""

    def add(self, cid: Any, task: Any, result: Any) -> None:
        raise NotImplementedError

    def merge(self, other: Accumulator) -> None:
        pass

    def empty(self) -> Accumulator:
        return _NOTHING

    def result(self, reference: Any) -> Any:
        raise NotImplementedError


_NOTHING = _Nothing()


def share_blocks(lo: int, hi: int, fanout: int = FANOUT) -> list[Block]:
    """The blocks that ``BlockFolder`` folds leaves ``[lo, hi)`` into, in order. With fan-out 4,
    ``share_blocks(0, 7) == [(0, 4), (4, 3)]`` and ``share_blocks(2, 9) == [(2, 1), (3, 1), (4, 4), (8, 1)]``."""
    if not 0 <= lo <= hi:
        raise ValueError(f"share_blocks: got [{lo}, {hi}); allowed: 0 <= lo <= hi")
    folder = BlockFolder(lo, _NOTHING, fanout)
    for _ in range(lo, hi):
        folder.push(lambda acc: None)
    return list(folder.blocks())


def combine(
    blocks: Mapping[Block, Accumulator] | Iterable[tuple[Block, Accumulator]], n: int, fanout: int = FANOUT
) -> Accumulator | None:
    """The root of the tree over ``n`` leaves from blocks that tile ``[0, n)`` (merging in place into
    the leftmost block of each node); ``None`` when ``n`` is 0."""
    table = dict(blocks.items() if isinstance(blocks, Mapping) else blocks)
    if n == 0:
        if table:
            raise ValueError(f"combine: {len(table)} blocks for 0 leaves")
        return None
    width = 1
    while width < n:
        width *= fanout
    count = len(table)
    root = _node(table, n, 0, width, fanout)
    if table:
        raise ValueError(f"combine: blocks {sorted(table)} of {count} overlap others; the blocks must tile [0, {n})")
    return root


def _node(table: dict[Block, Accumulator], n: int, start: int, size: int, fanout: int) -> Accumulator:
    # a module-level function, not a closure over ``table``: a recursive closure is a reference
    # cycle that would keep every block (a float64 copy of the model each) alive until the next
    # garbage collection. Blocks are popped as they are used, so what is left over did not fit.
    found = table.pop((start, min(size, n - start)), None)
    if found is not None:
        return found
    if size == 1:
        raise ValueError(f"combine: leaf {start} of {n} is in no block; the blocks must tile [0, {n})")
    child = size // fanout
    end = min(start + size, n)
    acc, at = None, start
    for j in range(fanout - 1, 1, -1):  # the fold of this node's first children, from a share's end
        if start + j * child < end and (start, j * child) in table:
            acc, at = table.pop((start, j * child)), start + j * child
            break
    while at < end:
        part = _node(table, n, at, child, fanout)
        if acc is None:
            acc = part
        else:
            acc.merge(part)
        at += child
    assert acc is not None
    return acc
