"""The ``natural`` partitioner: whole groups per client, greedy size balancing, and its use through
:func:`fedhet.data.federate` on a bundle with ``groups``."""

import numpy as np
import pytest
import torch

from fedhet.core import registry
from fedhet.core.rng import numpy_rng
from fedhet.data import DatasetBundle, federate
from fedhet.data.base import ArrayDataset
from fedhet.data.partition import natural


@pytest.fixture(autouse=True)
def data_only(monkeypatch):
    # Partitioners are looked up in the registry; importing fedhet.data alone registers them.
    monkeypatch.setattr(registry, "_loaded", True)


def _groups(sizes, ids=None, rng=None) -> np.ndarray:
    """One group id per example: group k (id ``ids[k]``, default k) has ``sizes[k]`` members, in blocks
    or, with ``rng``, shuffled."""
    ids = list(range(len(sizes))) if ids is None else ids
    g = np.repeat(np.asarray(ids, dtype=np.int64), sizes)
    return rng.permutation(g) if rng is not None else g


def _group_sets(groups: np.ndarray, parts: list[np.ndarray]) -> list[set[int]]:
    return [set(groups[p].tolist()) for p in parts]


def _check_whole(groups: np.ndarray, parts: list[np.ndarray]) -> None:
    """Parts are sorted, disjoint, cover everything, and hold whole groups."""
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(len(groups)))
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    owners = _group_sets(groups, parts)
    for a in range(len(owners)):
        for b in range(a + 1, len(owners)):
            assert not owners[a] & owners[b], "a group was split over clients"
    for p, owned in zip(parts, owners):
        # the client holds every member of each group it owns
        assert len(p) == int(np.isin(groups, list(owned)).sum())


def test_groups_are_never_split():
    rng = np.random.default_rng(0)
    groups = _groups([7, 1, 3, 12, 5, 5, 2, 9, 4, 6, 1, 8], ids=[40, 3, 17, 8, 99, 0, 5, 61, 22, 13, 70, 2], rng=rng)
    for num_clients in (1, 2, 3, 5, 12):
        parts = natural(groups, num_clients, numpy_rng(1, "partition"))
        assert len(parts) == num_clients
        _check_whole(groups, parts)


def test_as_many_groups_as_clients_gives_one_group_each():
    rng = np.random.default_rng(1)
    groups = _groups([9, 1, 4, 4, 2, 30], ids=[5, 11, 2, 7, 100, 3], rng=rng)
    for seed in range(5):
        parts = natural(groups, 6, numpy_rng(seed, "partition"))
        _check_whole(groups, parts)
        assert [len(s) for s in _group_sets(groups, parts)] == [1] * 6


def test_greedy_balancing_by_hand():
    # Largest first, each to the (first) client with the fewest examples so far:
    # 5 -> c0 (5, 0); 4 -> c1 (5, 4); 3 -> c1 (5, 7); 2 -> c0 (7, 7); 1 -> c0 (8, 7)
    groups = _groups([5, 4, 3, 2, 1])
    for seed in range(3):  # distinct sizes: the order, hence the result, does not depend on the seed
        parts = natural(groups, 2, numpy_rng(seed, "partition"))
        assert [len(p) for p in parts] == [8, 7]
        assert _group_sets(groups, parts) == [{0, 3, 4}, {1, 2}]
    # Greedy, not optimal: 3, 3, 2, 2, 2 -> c0 3, c1 3, c0 5, c1 5, c0 7 (a 6 / 6 split exists)
    groups = _groups([3, 3, 2, 2, 2])
    assert [len(p) for p in natural(groups, 2, numpy_rng(0, "partition"))] == [7, 5]
    # three clients: 6 -> c0; 5 -> c1; 4 -> c2; 3 -> c2 (7); 2 -> c1 (7); 1 -> c0 (7)
    groups = _groups([1, 2, 3, 4, 5, 6], ids=[10, 20, 30, 40, 50, 60])
    parts = natural(groups, 3, numpy_rng(0, "partition"))
    assert [len(p) for p in parts] == [7, 7, 7]
    assert _group_sets(groups, parts) == [{60, 10}, {50, 20}, {40, 30}]


def test_seeded_and_deterministic():
    groups = _groups([2] * 9 + [5, 5, 1], rng=np.random.default_rng(2))
    a = natural(groups, 3, numpy_rng(7, "partition"))
    b = natural(groups, 3, numpy_rng(7, "partition"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # equal-sized groups are dealt in a seeded random order: other seeds give other partitions,
    # with the same (greedy) client sizes
    seen = set()
    for seed in range(8):
        parts = natural(groups, 3, numpy_rng(seed, "partition"))
        _check_whole(groups, parts)
        # 5 -> c0; 5 -> c1; then the 2s to c2, c2, c2 (6), c0 (7), c1 (7), c2 (8), c0 (9), c1 (9),
        # c2 (10); the 1 -> c0 (10)
        assert [len(p) for p in parts] == [10, 9, 10]
        seen.add(tuple(tuple(sorted(s)) for s in _group_sets(groups, parts)))
    assert len(seen) > 1


def test_errors():
    groups = _groups([3, 3, 3])
    with pytest.raises(
        ValueError, match=r"data\.num_clients: got 4, allowed: <= the number of natural groups in the data \(3\)"
    ):
        natural(groups, 4, numpy_rng(0, "partition"))
    with pytest.raises(ValueError, match=r"data\.num_clients"):
        natural(groups, 10, numpy_rng(0, "partition"))  # more clients than examples
    with pytest.raises(ValueError, match="negative label"):
        natural(np.array([0, -1, 1]), 2, numpy_rng(0, "partition"))
    with pytest.raises(TypeError, match="unknown option 'alpha'"):
        natural(groups, 2, numpy_rng(0, "partition"), alpha=0.5)


# ------------------------------------------------------------------------------------ federate


def _bundle(groups=None, counts=(6, 5, 4, 3, 2)) -> DatasetBundle:
    """Example i has every feature equal to i (to trace it back) and label by blocks of ``counts``."""
    y = np.repeat(np.arange(len(counts)), counts)
    n = len(y)
    x = torch.arange(n, dtype=torch.float32).view(n, 1)
    train = ArrayDataset(x, torch.from_numpy(y))
    test = ArrayDataset(x[:3], torch.from_numpy(y[:3]))
    names = tuple(f"c{k}" for k in range(len(counts)))
    return DatasetBundle("toy", train, test, len(counts), (1,), names, groups=groups)


def _ids(d: ArrayDataset) -> list[int]:
    return d.x[:, 0].long().tolist()


def test_federate_natural_keeps_groups_whole():
    # groups cut across the label blocks: sizes 6, 5, 4, 3, 2 under ids 4, 0, 3, 1, 2, interleaved
    groups = _groups([6, 5, 4, 3, 2], ids=[4, 0, 3, 1, 2], rng=np.random.default_rng(3))
    fd = federate(_bundle(groups), num_clients=2, partitioner="natural", client_test_fraction=0.25, seed=0)
    held = [sorted(_ids(fd.clients_train[c]) + _ids(fd.clients_test[c])) for c in range(2)]
    assert sorted(held[0] + held[1]) == list(range(20))
    # 6 -> c0; 5 -> c1; 4 -> c1 (9); 3 -> c0 (9); 2 -> c0 (11)
    assert [len(h) for h in held] == [11, 9]
    assert [set(groups[h].tolist()) for h in held] == [{4, 1, 2}, {0, 3}]
    # the held-out split is still drawn per label within each client
    assert len(fd.clients_test[0]) + len(fd.clients_test[1]) > 0


def test_federate_natural_one_group_per_client_and_seeded():
    groups = _groups([6, 5, 4, 3, 2], rng=np.random.default_rng(4))
    a = federate(_bundle(groups), num_clients=5, partitioner="natural", client_test_fraction=0.0, seed=3)
    assert [len(set(groups[_ids(d)].tolist())) for d in a.clients_train] == [1] * 5
    assert sorted(len(d) for d in a.clients_train) == [2, 3, 4, 5, 6]
    b = federate(_bundle(groups), num_clients=5, partitioner="natural", client_test_fraction=0.0, seed=3)
    assert [_ids(d) for d in a.clients_train] == [_ids(d) for d in b.clients_train]


def test_federate_natural_with_a_train_subset_keeps_groups_of_the_subset_whole():
    groups = _groups([4] * 10, rng=np.random.default_rng(5))
    bundle = _bundle(groups, counts=(10, 10, 10, 10))
    fd = federate(bundle, num_clients=3, partitioner="natural", client_test_fraction=0.0, train_subset=25, seed=1)
    owned = [set(groups[_ids(d)].tolist()) for d in fd.clients_train]
    assert sum(len(d) for d in fd.clients_train) == 25
    for a in range(3):
        for b in range(a + 1, 3):
            assert not owned[a] & owned[b]


def test_federate_natural_errors():
    with pytest.raises(ValueError, match=r"data\.partitioner: got 'natural'.*has no natural groups"):
        federate(_bundle(None), num_clients=2, partitioner="natural")
    groups = _groups([10, 10])
    with pytest.raises(
        ValueError, match=r"data\.num_clients: got 3, allowed: <= the number of natural groups in the data \(2\)"
    ):
        federate(_bundle(groups), num_clients=3, partitioner="natural")
