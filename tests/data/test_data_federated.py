import numpy as np
import pytest
import torch

from fedhet.core import registry
from fedhet.core.rng import numpy_rng
from fedhet.data import DatasetBundle, FederatedDataset, federate, stratified_split
from fedhet.data.base import ArrayDataset
from fedhet.data.transforms import RandomCropFlip


@pytest.fixture(autouse=True)
def data_only(monkeypatch):
    # Partitioners are looked up in the registry; importing fedhet.data alone registers them.
    monkeypatch.setattr(registry, "_loaded", True)


def _bundle(counts=(8, 4, 12, 10), shape=(1,), transform=None) -> DatasetBundle:
    """Example i has label from ``counts`` (in blocks) and every feature equal to i, so a client's
    examples can be traced back to the training set."""
    y = np.repeat(np.arange(len(counts)), counts)
    n = len(y)
    x = torch.arange(n, dtype=torch.float32).view(n, *([1] * len(shape))).expand(n, *shape).contiguous()
    train = ArrayDataset(x, torch.from_numpy(y))
    test = ArrayDataset(x[:3], torch.from_numpy(y[:3]))
    names = tuple(f"c{k}" for k in range(len(counts)))
    return DatasetBundle("toy", train, test, len(counts), shape, names, transform)


def _ids(d: ArrayDataset) -> list[int]:
    return d.x.reshape(len(d), -1)[:, 0].long().tolist()


def test_stratified_client_split_is_exact_on_a_hand_built_example():
    # One client holding everything; per label round-half-up(0.25 * n) goes to its held-out split:
    # 8 -> 2, 4 -> 1, 12 -> 3, 10 -> 2.5 -> 3.
    fd = federate(_bundle(), num_clients=1, client_test_fraction=0.25, seed=0)
    assert fd.label_counts(0) == (6, 3, 9, 7)
    assert np.bincount(fd.clients_test[0].y.numpy()).tolist() == [2, 1, 3, 3]
    # nothing lost, nothing duplicated
    assert sorted(_ids(fd.clients_train[0]) + _ids(fd.clients_test[0])) == list(range(34))
    # labels still belong to their examples
    y = np.repeat(np.arange(4), (8, 4, 12, 10))
    for d in (fd.clients_train[0], fd.clients_test[0]):
        assert d.y.tolist() == y[_ids(d)].tolist()


def test_stratified_split_helper():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    kept, held = stratified_split(labels, 0.5, numpy_rng(0, "s"))
    assert np.bincount(labels[held], minlength=3).tolist() == [2, 1, 1]  # 2, 1, round(0.5) = 1
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(7))


def test_every_client_split_has_its_partition_proportions():
    labels = np.repeat(np.arange(5), 40)
    bundle = _bundle(counts=(40,) * 5)
    fd = federate(bundle, num_clients=4, partitioner="dirichlet", alpha=0.5, min_size=5, client_test_fraction=0.3)
    seen = []
    for cid in range(4):
        train, test = fd.clients_train[cid], fd.clients_test[cid]
        part = np.bincount(labels[_ids(train) + _ids(test)], minlength=5)
        expected_test = np.floor(0.3 * part + 0.5).astype(int)
        assert np.bincount(test.y.numpy(), minlength=5).tolist() == expected_test.tolist()
        assert list(fd.label_counts(cid)) == (part - expected_test).tolist()
        seen += _ids(train) + _ids(test)
    assert sorted(seen) == list(range(200))


def test_zero_client_test_fraction_gives_empty_splits_with_the_example_shape():
    fd = federate(_bundle(shape=(1, 2, 2)), num_clients=3, client_test_fraction=0.0)
    assert [len(d) for d in fd.clients_test] == [0, 0, 0]
    assert all(d.x.shape == (0, 1, 2, 2) and d.y.dtype == torch.int64 for d in fd.clients_test)
    assert sum(len(d) for d in fd.clients_train) == 34


def test_fields_are_carried_over():
    t = RandomCropFlip(padding=1)
    bundle = _bundle(transform=t)
    fd = federate(bundle, num_clients=2)
    assert isinstance(fd, FederatedDataset)
    assert fd.num_clients == 2 and fd.num_classes == 4 and fd.input_shape == (1,) and fd.name == "toy"
    assert fd.test is bundle.test and fd.train_transform is t


def test_train_subset_is_seeded_and_partitioned():
    bundle = _bundle(counts=(50,) * 4)
    a = federate(bundle, num_clients=4, train_subset=40, client_test_fraction=0.0, seed=1)
    b = federate(bundle, num_clients=4, train_subset=40, client_test_fraction=0.0, seed=1)
    c = federate(bundle, num_clients=4, train_subset=40, client_test_fraction=0.0, seed=2)
    ids_a = [_ids(d) for d in a.clients_train]
    assert [len(i) for i in ids_a] == [10] * 4
    assert len(set(sum(ids_a, []))) == 40
    assert ids_a == [_ids(d) for d in b.clients_train]
    assert ids_a != [_ids(d) for d in c.clients_train]


def test_same_seed_same_clients():
    bundle = _bundle(counts=(30,) * 4)
    kw = dict(num_clients=3, partitioner="shards", classes_per_client=2)
    a, b, c = federate(bundle, seed=5, **kw), federate(bundle, seed=5, **kw), federate(bundle, seed=6, **kw)
    assert [_ids(d) for d in a.clients_train + a.clients_test] == [_ids(d) for d in b.clients_train + b.clients_test]
    assert [_ids(d) for d in a.clients_train] != [_ids(d) for d in c.clients_train]


def test_summary_lines():
    fd = federate(_bundle(), num_clients=1, client_test_fraction=0.25)
    text = fd.summary()
    assert "toy: 1 clients, 4 classes (c0, c1, c2, c3), input shape (1,)" in text
    assert "train label counts (first 1 of 1 clients) in class order c0, c1, c2, c3:" in text
    assert "train examples per client: min 25 / median 25 / max 25 (total 25; held out on clients: 9)" in text
    assert "classes per client: min 4 / median 4 / max 4" in text
    assert "global test examples: 3" in text
    assert "client 0: 6 3 9 7" in text


def test_summary_shows_at_most_ten_clients():
    fd = federate(_bundle(counts=(30,) * 4), num_clients=12, client_test_fraction=0.0)
    lines = fd.summary().splitlines()
    assert "first 10 of 12 clients" in lines[4]
    assert len(lines) == 5 + 10


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"num_clients": 0}, ValueError, r"data.num_clients: got 0, allowed: an integer >= 1"),
        ({"num_clients": 35}, ValueError, r"data.num_clients: got 35, allowed: <= the number of training examples \(34\)"),
        ({"num_clients": 2, "client_test_fraction": 1.0}, ValueError, r"data.client_test_fraction: got 1.0, allowed: 0 <= value < 1"),
        ({"num_clients": 2, "client_test_fraction": -0.1}, ValueError, r"data.client_test_fraction: got -0.1"),
        ({"num_clients": 2, "train_subset": 35}, ValueError, r"data.train_subset: got 35, allowed: an integer in \[2, 34\]"),
        ({"num_clients": 2, "partitioner": "louvain"}, ValueError, r"data.partitioner: got 'louvain', allowed: dirichlet, iid, natural, shards"),
        ({"num_clients": 2, "partitioner": "natural"}, ValueError, r"data.partitioner: got 'natural', allowed: a partitioner other than 'natural': dataset 'toy' has no natural groups"),
        ({"num_clients": 2, "partitioner": "dirichlet", "alpha": -1}, ValueError, r"data.alpha: got -1, allowed: > 0"),
        ({"num_clients": 2, "alpha": 1.0}, TypeError, r"partitioner 'iid': unknown option 'alpha'"),
    ],
)
def test_bad_arguments_name_the_field(options, error, match):
    with pytest.raises(error, match=match):
        federate(_bundle(), **options)


def test_test_subset_is_a_stratified_seeded_subset_of_the_test_set():
    bundle = _bundle(counts=(8, 4, 12, 10))
    full = federate(bundle, num_clients=2, seed=0)
    half = federate(bundle, num_clients=2, seed=0, test_subset=len(bundle.test) // 2)
    again = federate(bundle, num_clients=2, seed=0, test_subset=len(bundle.test) // 2)
    assert len(half.test) == len(bundle.test) // 2
    assert torch.equal(half.test.x, again.test.x)
    # each class keeps its share of the test set
    full_counts = np.bincount(full.test.y.numpy(), minlength=4)
    half_counts = np.bincount(half.test.y.numpy(), minlength=4)
    assert np.all(np.abs(half_counts - full_counts / 2) <= 1)
    assert len(federate(bundle, num_clients=2, test_subset=len(bundle.test)).test) == len(bundle.test)
    with pytest.raises(ValueError, match="test_subset"):
        federate(bundle, num_clients=2, test_subset=len(bundle.test) + 1)
