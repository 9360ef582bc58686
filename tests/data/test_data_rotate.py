"""fedhet.data.federated: rotated clients (``rotate_fraction``, ``rotate_degrees``) for clustered FL."""

import math

import numpy as np
import pytest
import torch

from fedhet.core import registry
from fedhet.core.rng import numpy_rng
from fedhet.data import DatasetBundle, FederatedDataset, federate
from fedhet.data.base import ArrayDataset
from fedhet.experiment.build import build_run
from fedhet.experiment.config import ConfigError, load_config


@pytest.fixture(autouse=True)
def data_only(monkeypatch):
    monkeypatch.setattr(registry, "_loaded", True)


def _images(n=40, shape=(1, 3, 3), classes=4) -> DatasetBundle:
    """Example i: label i % classes, pixels i*100 + 0..H*W-1 (so every image is asymmetric and
    can be traced back to the training set)."""
    y = torch.arange(n) % classes
    pixels = int(np.prod(shape))
    x = (torch.arange(n, dtype=torch.float32)[:, None] * 100 + torch.arange(pixels, dtype=torch.float32)).reshape(n, *shape)
    train = ArrayDataset(x, y)
    test = ArrayDataset(x[:5].clone(), y[:5].clone())
    return DatasetBundle("img", train, test, classes, shape, tuple(str(c) for c in range(classes)))


def _tabular() -> DatasetBundle:
    x = torch.arange(20, dtype=torch.float32).reshape(10, 2)
    y = torch.arange(10) % 2
    return DatasetBundle("tab", ArrayDataset(x, y), ArrayDataset(x, y), 2, (2,), ("a", "b"))


@pytest.mark.parametrize("degrees, turns", [(90, 1), (180, 2), (270, 3)])
def test_exactly_the_drawn_clients_get_rotated_train_and_test_images(degrees, turns):
    bundle = _images()
    plain = federate(bundle, num_clients=8, seed=3, client_test_fraction=0.25)
    rot = federate(bundle, num_clients=8, seed=3, client_test_fraction=0.25, rotate_fraction=0.5, rotate_degrees=degrees)
    chosen = sorted(int(c) for c in numpy_rng(3, "rotate").choice(8, size=4, replace=False))
    assert [c for c, g in enumerate(rot.client_groups) if g == 1] == chosen
    assert plain.client_groups == (0,) * 8
    for cid in range(8):
        for split in ("clients_train", "clients_test"):
            a, b = getattr(plain, split)[cid], getattr(rot, split)[cid]
            assert len(a) > 0 and torch.equal(a.y, b.y)
            want = torch.rot90(a.x, k=turns, dims=(-2, -1)) if cid in chosen else a.x
            assert torch.equal(b.x, want)
            if cid in chosen:
                assert not torch.equal(b.x, a.x)
    # by hand, one image: [[0 1 2] [3 4 5] [6 7 8]] turned 90 degrees counter-clockwise
    if degrees == 90:
        img = torch.arange(9.0).reshape(1, 1, 3, 3)
        assert torch.rot90(img, 1, dims=(-2, -1)).reshape(3, 3).tolist() == [[2, 5, 8], [1, 4, 7], [0, 3, 6]]
    assert torch.equal(rot.test.x, bundle.test.x)  # the global test set is left as it is
    assert rot.clients_train[chosen[0]].x.is_contiguous()


@pytest.mark.parametrize("fraction, n, rotated", [(0.5, 8, 4), (0.3, 10, 3), (0.25, 10, 3), (1.0, 5, 5), (0.01, 7, 1), (0.0, 6, 0)])
def test_the_number_of_rotated_clients_is_the_ceiling(fraction, n, rotated):
    fd = federate(_images(n=60), num_clients=n, rotate_fraction=fraction)
    assert sum(fd.client_groups) == rotated == math.ceil(round(fraction * n, 9))


def test_the_draw_depends_on_the_seed_only():
    a = federate(_images(), num_clients=10, seed=1, rotate_fraction=0.5)
    b = federate(_images(), num_clients=10, seed=1, rotate_fraction=0.5)
    assert a.client_groups == b.client_groups
    groups = {federate(_images(), num_clients=10, seed=s, rotate_fraction=0.5).client_groups for s in range(6)}
    assert len(groups) > 1


def test_non_square_images_rotate_by_180_only():
    bundle = _images(shape=(2, 2, 3))
    fd = federate(bundle, num_clients=2, rotate_fraction=1.0, rotate_degrees=180, client_test_fraction=0.0)
    assert fd.clients_train[0].x.shape[1:] == (2, 2, 3)
    with pytest.raises(ValueError, match=r"data.rotate_degrees: got 90, allowed: 180 for dataset 'img': its images are 2x3, not square"):
        federate(bundle, num_clients=2, rotate_fraction=0.5, rotate_degrees=90)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rotate_fraction": 1.5}, r"data.rotate_fraction: got 1.5, allowed: 0 <= value <= 1"),
        ({"rotate_fraction": -0.1}, r"data.rotate_fraction: got -0.1, allowed: 0 <= value <= 1"),
        ({"rotate_fraction": True}, r"data.rotate_fraction: got True"),
        ({"rotate_degrees": 45}, r"data.rotate_degrees: got 45, allowed: 90, 180, 270"),
        ({"rotate_degrees": 180.0}, r"data.rotate_degrees: got 180.0, allowed: 90, 180, 270"),
    ],
)
def test_bad_rotation_options_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        federate(_images(), num_clients=4, **kwargs)


def test_rotation_needs_images():
    with pytest.raises(ValueError, match=r"data.rotate_fraction: got 0.5, allowed: 0 for dataset 'tab': rotation needs images"):
        federate(_tabular(), num_clients=2, rotate_fraction=0.5)
    assert federate(_tabular(), num_clients=2).client_groups == (0, 0)  # off by default


def test_federated_dataset_defaults_to_group_0_and_checks_the_length():
    d = ArrayDataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))
    fd = FederatedDataset("x", [d, d], [d, d], d, 1, (1,), None)
    assert fd.client_groups == (0, 0)
    assert FederatedDataset("x", [d, d], [d, d], d, 1, (1,), None, client_groups=(1, 0)).client_groups == (1, 0)
    with pytest.raises(ValueError, match="3 client groups for 2 clients"):
        FederatedDataset("x", [d, d], [d, d], d, 1, (1,), None, client_groups=(0, 1, 0))


def test_rotation_options_flow_from_the_config(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_loaded", False)
    overrides = ["data.dataset=digits", "data.num_clients=6", "data.rotate_fraction=0.5", "data.rotate_degrees=90", "logging.progress=off"]
    run = build_run(load_config(None, overrides), tmp_path)
    fd = run.world.dataset
    assert sum(fd.client_groups) == 3
    plain = build_run(load_config(None, overrides[:2] + ["logging.progress=off"]), tmp_path / "plain").world.dataset
    for cid, g in enumerate(fd.client_groups):
        want = torch.rot90(plain.clients_train[cid].x, 1, dims=(-2, -1)) if g else plain.clients_train[cid].x
        assert torch.equal(fd.clients_train[cid].x, want)
    with pytest.raises(ConfigError, match="data.rotate_degrees"):
        load_config(None, ["data.rotate_degrees=45"])
    with pytest.raises(ConfigError, match="data.rotate_fraction"):
        load_config(None, ["data.rotate_fraction=1.5"])
    with pytest.raises(ConfigError, match="data.rotate_fraction: got 0.5, allowed: 0 for dataset 'synthetic'"):
        build_run(load_config(None, ["data.dataset=synthetic", "data.rotate_fraction=0.5", "logging.progress=off"]), tmp_path / "s")
