import numpy as np
import pytest
import torch

import fedhet.data  # noqa: F401  (registers the built-in datasets and partitioners)
from fedhet.core import registry
from fedhet.core.registry import DATASETS, PARTITIONERS
from fedhet.data import DatasetBundle, load_dataset
from fedhet.data.base import ArrayDataset
from fedhet.data.datasets import cifar10, digits, synthetic


@pytest.fixture
def data_only(monkeypatch):
    # Look entries up without importing every other built-in module: importing fedhet.data alone
    # registers the datasets and partitioners.
    monkeypatch.setattr(registry, "_loaded", True)


def test_entries_are_registered(data_only):
    assert DATASETS.get("digits") is digits
    assert DATASETS.get("synthetic") is synthetic
    assert DATASETS.get("cifar10") is cifar10
    assert {"iid", "dirichlet", "shards"} <= set(PARTITIONERS.names())


def test_load_dataset_unknown_name(data_only):
    with pytest.raises(ValueError, match=r"data.name: got 'mnist', allowed: ade_ner, cifar10, digits, imagefolder, mrpc, sst2, stsb, synthetic, synthetic_clients, tabular, textfile"):
        load_dataset("mnist")


def test_digits_shapes_split_and_standardization():
    b = digits(seed=0)
    assert len(b.train) + len(b.test) == 1797
    assert (len(b.train), len(b.test)) == (1437, 360)
    assert b.train.x.shape == (1437, 1, 8, 8) and b.test.x.shape == (360, 1, 8, 8)
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10 and b.class_names[3] == "3"
    assert b.train_transform is None
    assert abs(float(b.train.x.mean())) < 1e-4 and abs(float(b.train.x.std()) - 1.0) < 1e-3
    # stratified: each class (174 to 183 images) has a fifth of its images, 35 to 37, in test
    counts = np.bincount(b.test.y.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_split_depends_on_seed_only():
    a, b, c = digits(seed=1), digits(seed=1), digits(seed=2)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.test.x, c.test.x)


def test_digits_test_fraction():
    b = digits(test_fraction=0.5)
    assert (len(b.train), len(b.test)) == (898, 899)


def test_synthetic_shapes_determinism_and_learnability():
    b = synthetic(seed=3, num_samples=400, num_features=5, num_classes=4)
    assert b.train.x.shape == (320, 5) and b.test.x.shape == (80, 5) and b.input_shape == (5,)
    assert np.array_equal(np.bincount(b.test.y.numpy()), [20, 20, 20, 20])
    again = synthetic(seed=3, num_samples=400, num_features=5, num_classes=4)
    assert torch.equal(b.train.x, again.train.x)
    assert not torch.equal(b.train.x, synthetic(seed=4, num_samples=400, num_features=5, num_classes=4).train.x)
    # Nearest class mean (estimated on train) classifies the test set well at the default noise.
    default = synthetic(seed=0)
    means = torch.stack([default.train.x[default.train.y == c].mean(0) for c in range(4)])
    pred = torch.cdist(default.test.x, means).argmin(1)
    assert (pred == default.test.y).float().mean() > 0.9


@pytest.mark.parametrize(
    ("loader", "options", "error", "match"),
    [
        (digits, {"size": 3}, TypeError, r"dataset 'digits': unknown option 'size'; allowed options: root, seed, test_fraction"),
        (digits, {"test_fraction": 1.5}, ValueError, r"data.test_fraction: got 1.5, allowed: 0 < value < 1"),
        (digits, {"test_fraction": 0}, ValueError, r"data.test_fraction: got 0"),
        (synthetic, {"num_classes": 1}, ValueError, r"data.num_classes: got 1, allowed: an integer >= 2"),
        (synthetic, {"num_samples": 10}, ValueError, r"data.num_samples: got 10, allowed: an integer >= 20"),
        (synthetic, {"noise": -1.0}, ValueError, r"data.noise: got -1.0, allowed: >= 0"),
        (synthetic, {"classes": 3}, TypeError, r"dataset 'synthetic': unknown option 'classes'"),
        (cifar10, {"augmentation": True}, TypeError, r"dataset 'cifar10': unknown option 'augmentation'"),
        (cifar10, {"augment": "yes"}, ValueError, r"data.augment: got 'yes', allowed: true or false"),
    ],
)
def test_bad_options(loader, options, error, match):
    with pytest.raises(error, match=match):
        loader(**options)


def test_bundle_checks_the_example_shape():
    data = ArrayDataset(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"train examples have shape \(3,\), input_shape says \(4,\)"):
        DatasetBundle("t", data, data, 2, (4,), ("a", "b"))
