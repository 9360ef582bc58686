"""Decentralized topologies and the bytes a sparse model takes on a link."""

from __future__ import annotations

import pytest
import torch

from fedhet.core.types import sparse_nbytes
from fedhet.simulation.topology import neighbours


def test_ring_and_full():
    assert neighbours("ring", 4, 1, 0) == {0: [1, 3], 1: [0, 2], 2: [1, 3], 3: [0, 2]}
    assert neighbours("ring", 2, 1, 0) == {0: [1], 1: [0]}
    assert neighbours("ring", 1, 1, 0) == {0: []}
    assert neighbours("full", 3, 5, 0) == {0: [1, 2], 1: [0, 2], 2: [0, 1]}


def test_random_topology_is_seeded_per_round_and_never_includes_the_client():
    a = neighbours("random", 10, 3, seed=7, k=4)
    assert a == neighbours("random", 10, 3, seed=7, k=4)
    assert all(len(v) == 4 and i not in v and len(set(v)) == 4 for i, v in a.items())
    assert a != neighbours("random", 10, 4, seed=7, k=4)  # redrawn every round
    assert a != neighbours("random", 10, 3, seed=8, k=4)
    with pytest.raises(ValueError, match="topology.k"):
        neighbours("random", 10, 1, 0, k=10)
    with pytest.raises(ValueError, match="topology: got 'star'"):
        neighbours("star", 10, 1, 0)


def test_sparse_bytes_by_hand():
    t = torch.zeros(100)  # float32
    dense = {"b": torch.zeros(3)}
    few = torch.zeros(100, dtype=torch.bool)
    few[:2] = True  # 2 kept: 8 value bytes + min(13-byte bitmap, 8 index bytes) = 16
    assert sparse_nbytes({"w": t, **dense}, {"w": few}) == 16 + 12
    many = torch.ones(100, dtype=torch.bool)
    many[:50] = False  # 50 kept: 200 + min(13, 200) = 213
    assert sparse_nbytes({"w": t}, {"w": many}) == 213
    with pytest.raises(ValueError, match="shape"):
        sparse_nbytes({"w": t}, {"w": torch.ones(10, dtype=torch.bool)})
