import numpy as np
import pytest

from fedhet.core.rng import numpy_rng
from fedhet.data.partition import dirichlet, iid, shards

PARTITIONERS = {
    "iid": (iid, {}),
    "dirichlet": (dirichlet, {"alpha": 0.5, "min_size": 5}),
    "shards": (shards, {"classes_per_client": 2}),
}


def _labels(per_class: int = 50, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def _run(name: str, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    fn, options = PARTITIONERS[name]
    return fn(labels, num_clients, numpy_rng(seed, "partition"), **options)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_parts_are_disjoint_sorted_int64_and_cover_everything(name):
    labels = _labels()
    parts = _run(name, labels, 10, seed=0)
    assert len(parts) == 10
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    flat = np.concatenate(parts)
    assert len(flat) == len(labels)
    assert np.array_equal(np.sort(flat), np.arange(len(labels)))


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_same_seed_same_parts_different_seed_different_parts(name):
    labels = _labels()
    a, b, c = (_run(name, labels, 10, seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_differ_by_at_most_one():
    parts = iid(np.zeros(103, dtype=np.int64), 10, numpy_rng(0, "partition"))
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3


def test_dirichlet_huge_alpha_is_nearly_balanced():
    labels = _labels(per_class=100, num_classes=10)
    parts = dirichlet(labels, 5, numpy_rng(0, "partition"), alpha=1e5)
    counts = np.array([np.bincount(labels[p], minlength=10) for p in parts])
    # Each class of 100 split five ways: 20 each, up to rounding of the Dirichlet draw.
    assert np.all(np.abs(counts - 20) <= 2), counts


def test_dirichlet_small_alpha_is_skewed():
    labels = _labels(per_class=100, num_classes=10)
    parts = dirichlet(labels, 5, numpy_rng(0, "partition"), alpha=0.05)
    counts = np.array([np.bincount(labels[p], minlength=10) for p in parts])
    # Each class goes mostly to one client: its largest share is well over the balanced 20%.
    top_share = counts.max(axis=0) / counts.sum(axis=0)
    assert np.mean(top_share) > 0.7, counts
    assert min(len(p) for p in parts) >= 10  # default min_size


def test_dirichlet_gives_up_with_a_clear_message():
    labels = np.repeat([0, 1], 50)  # with alpha tiny each class lands on one client: 8 clients get nothing
    with pytest.raises(ValueError, match=r"after 5 draws .*data.min_size=1 .*raise data.alpha"):
        dirichlet(labels, 10, numpy_rng(0, "partition"), alpha=1e-4, min_size=1, max_tries=5)


def test_shards_exactly_k_classes_per_client_on_a_constructed_array():
    # 10 classes x 20 examples, 20 clients x 2 shards -> 40 pure shards of 5, four per class.
    labels = _labels(per_class=20, num_classes=10)
    for seed in range(10):
        parts = shards(labels, 20, numpy_rng(seed, "partition"), classes_per_client=2)
        assert [len(p) for p in parts] == [10] * 20
        assert [len(np.unique(labels[p])) for p in parts] == [2] * 20
        assert all(sorted(np.bincount(labels[p])[np.unique(labels[p])]) == [5, 5] for p in parts)


def test_shards_single_shard_clients_each_hold_one_class():
    labels = np.array([0, 0, 1, 1, 2, 2])
    parts = shards(labels, 3, numpy_rng(0, "partition"), classes_per_client=1)
    assert sorted(tuple(labels[p]) for p in parts) == [(0, 0), (1, 1), (2, 2)]


@pytest.mark.parametrize(
    ("fn", "options", "error", "match"),
    [
        (dirichlet, {"alpha": -1}, ValueError, r"data.alpha: got -1, allowed: > 0"),
        (dirichlet, {"alpha": 0}, ValueError, r"data.alpha: got 0, allowed: > 0"),
        (dirichlet, {}, ValueError, r"data.alpha: got None"),
        (dirichlet, {"alpha": "big"}, ValueError, r"data.alpha: got 'big'"),
        (dirichlet, {"alpha": 1.0, "min_size": -1}, ValueError, r"data.min_size: got -1, allowed: an integer >= 0"),
        (dirichlet, {"alpha": 1.0, "min_size": 30}, ValueError, r"data.min_size: got 30, allowed: <= 20"),
        (dirichlet, {"alpha": 1.0, "beta": 2}, TypeError, r"partitioner 'dirichlet': unknown option 'beta'"),
        (shards, {}, ValueError, r"data.classes_per_client: got None"),
        (shards, {"classes_per_client": 0}, ValueError, r"data.classes_per_client: got 0, allowed: an integer >= 1"),
        (shards, {"classes_per_client": 2.5}, ValueError, r"data.classes_per_client: got 2.5"),
        (shards, {"classes_per_client": 30}, ValueError, r"data.classes_per_client: got 30, allowed: <= 20"),
        (iid, {"alpha": 1.0}, TypeError, r"partitioner 'iid': unknown option 'alpha'; allowed options: none"),
    ],
)
def test_bad_options_name_the_field(fn, options, error, match):
    with pytest.raises(error, match=match):
        fn(np.repeat(np.arange(4), 25), 5, numpy_rng(0, "partition"), **options)


@pytest.mark.parametrize("num_clients", [0, 101, True])
def test_bad_num_clients(num_clients):
    with pytest.raises(ValueError, match=rf"data.num_clients: got {num_clients!r}, allowed: an integer in \[1, 100\]"):
        iid(np.zeros(100, dtype=np.int64), num_clients, numpy_rng(0, "partition"))
