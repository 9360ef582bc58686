"""The canonical grouping of a round's partial sums: the same bits on any number of workers.

Float64 addition is not associative, so a round's aggregate must not depend on which worker ran
which client. Every executor therefore folds the round's clients in one fixed shape that depends
only on the number of clients: the k-th client in client-id order is leaf ``k`` of an implicit
binary tree of ``2**ceil(log2(n))`` leaves, and each inner node is ``left.merge(right)`` (a node
whose right half holds no client is its left half). A failed client is an empty leaf, so it does
not shift the others.

A worker that runs a contiguous share ``[lo, hi)`` of the leaves folds it into the aligned blocks
that tile it (``aligned_blocks``): at most ``2 log2(n)`` partial sums, one when the share is itself
an aligned block, built leaf by leaf while it trains (``BlockFolder``: at most ``log2(n)`` partial
sums held at once). The driver combines every worker's blocks with ``combine``. Sequential,
multi-process and Ray executors all go through these two functions, so they give the same bits
whatever the number of workers and wherever the share boundaries fall.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from fedhet.aggregation.base import Accumulator

__all__ = ["BlockFolder", "aligned_blocks", "combine"]

Block = tuple[int, int]  # (first leaf, number of leaves), the number a power of two


def aligned_blocks(lo: int, hi: int) -> list[Block]:
    """The blocks of the implicit tree that tile leaves ``[lo, hi)``: each starts at a multiple of
    its size, and each is as large as that allows. ``aligned_blocks(0, 7) == [(0, 4), (4, 2), (6, 1)]``."""
    if not 0 <= lo <= hi:
        raise ValueError(f"aligned_blocks: got [{lo}, {hi}); allowed: 0 <= lo <= hi")
    out: list[Block] = []
    at = lo
    while at < hi:
        size = 1
        while at % (2 * size) == 0 and at + 2 * size <= hi:
            size *= 2
        out.append((at, size))
        at += size
    return out


class BlockFolder:
    """Folds the leaves of ``[lo, hi)``, pushed in order, into ``aligned_blocks(lo, hi)``.

    ``push`` merges a new node into the one before it while the two are the halves of one aligned
    block (a binary counter), so only the unfinished blocks stay in memory. A leaf that is the right
    half of a pair whose left leaf is already here is added straight into that leaf's accumulator
    instead of into a fresh one that would then be merged: the same bits, by the accumulator
    contract (adding a client equals merging in an empty accumulator holding only that client), and
    half the allocations."""

    def __init__(self, lo: int, template: Accumulator) -> None:
        self.next = lo
        self.template = template
        self._stack: list[tuple[int, int, Accumulator]] = []  # (first leaf, size, partial)

    def push(self, add: Callable[[Accumulator], None]) -> None:
        """The next leaf: ``add(acc)`` puts its client into ``acc`` (or nothing, for a client that
        failed)."""
        start = self.next
        self.next += 1
        top = self._stack[-1] if self._stack else None
        if start % 2 == 1 and top is not None and top[0] == start - 1 and top[1] == 1:
            self._stack.pop()
            add(top[2])
            self._carry(start - 1, 2, top[2])
            return
        node = self.template.empty()
        add(node)
        self._carry(start, 1, node)

    def _carry(self, start: int, size: int, node: Accumulator) -> None:
        while self._stack:
            s, z, left = self._stack[-1]
            if z != size or s + z != start or s % (2 * z) != 0:
                break
            self._stack.pop()
            left.merge(node)
            start, size, node = s, 2 * z, left
        self._stack.append((start, size, node))

    def blocks(self) -> dict[Block, Accumulator]:
        """The finished blocks; call after the last leaf of the range was pushed."""
        return {(s, z): acc for s, z, acc in self._stack}


def combine(blocks: Mapping[Block, Accumulator] | Iterable[tuple[Block, Accumulator]], n: int) -> Accumulator | None:
    """The root of the implicit tree over ``n`` leaves from blocks that tile ``[0, n)`` (merging in
    place into the left halves); ``None`` when ``n`` is 0."""
    table = dict(blocks.items() if isinstance(blocks, Mapping) else blocks)
    if n == 0:
        return None
    width = 1
    while width < n:
        width *= 2
    return _node(table, n, 0, width)


def _node(table: dict[Block, Accumulator], n: int, start: int, size: int) -> Accumulator | None:
    # a module-level function, not a closure over ``table``: a recursive closure is a reference
    # cycle that would keep every block (a float64 copy of the model each) alive until the next
    # garbage collection
    if start >= n:
        return None
    found = table.get((start, size))
    if found is not None:
        return found
    if size == 1:
        raise ValueError(f"combine: leaf {start} of {n} is in no block; the blocks must tile [0, {n})")
    half = size // 2
    left, right = _node(table, n, start, half), _node(table, n, start + half, half)
    assert left is not None
    if right is not None:
        left.merge(right)
    return left
