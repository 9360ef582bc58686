"""``synthetic_clients``: a natively federated dataset whose clients' examples are made on demand."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from executor_cases import assert_same_tensors, comparable, finish, make_run

from fedhet.data import ArrayDataset, ClientSplits, federate, load_dataset
from fedhet.experiment.build import build_run, load_federated
from fedhet.experiment.config import ConfigError, load_config


def _fed(num_clients: int = 50, partitioner: str = "iid", seed: int = 0, fraction: float = 0.2, **options):
    extra = {"alpha": options.pop("alpha")} if "alpha" in options else {}
    source = load_dataset("synthetic_clients", seed=seed, **options)
    return federate(
        source, num_clients=num_clients, partitioner=partitioner, seed=seed, client_test_fraction=fraction, **extra
    )


def test_sizes_and_label_counts_are_known_without_making_a_client() -> None:
    calls: list[int] = []
    fed = _fed(num_clients=40, examples=10)
    make = fed.clients_train.make
    fed.clients_train.make = lambda cid: (calls.append(cid), make(cid))[1]
    sizes = fed.description()["train_examples"]
    counts = [fed.label_counts(c) for c in range(40)]
    fed.summary()
    assert calls == []
    assert sizes == [sum(c) for c in counts]
    # 10 examples a client, 0.2 held out of each label's count n: floor(0.2 n + 0.5) (halves round up)
    held = fed.description()["held_out_examples"]
    for cid in range(40):
        train_c, held_c = np.array(counts[cid]), fed.clients_test.label_counts[cid]
        whole = train_c + held_c
        assert whole.sum() == 10
        assert np.array_equal(held_c, np.floor(0.2 * whole + 0.5).astype(int))
        assert held[cid] == held_c.sum()


def test_a_client_made_twice_or_in_another_process_is_the_same() -> None:
    fed = _fed(examples=12, shift=0.5)
    again = pickle.loads(pickle.dumps(_fed(examples=12, shift=0.5)))
    for cid in (0, 7, 49):
        for splits, other in ((fed.clients_train, again.clients_train), (fed.clients_test, again.clients_test)):
            a, b = splits[cid], other[cid]
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
            assert a.x.dtype == torch.float32 and a.y.dtype == torch.int64 and a.x.shape[1] == 20
        # labels made agree with the counts fixed for the client
        got = torch.bincount(fed.clients_train[cid].y, minlength=4).tolist()
        assert tuple(got) == fed.label_counts(cid)
    assert not torch.equal(fed.clients_train[0].x[:3], fed.clients_train[1].x[:3])
    other_seed = _fed(examples=12, shift=0.5, seed=1)
    assert not torch.equal(fed.clients_train[0].x, other_seed.clients_train[0].x)


def test_clients_shift_their_features_and_dirichlet_skews_their_labels() -> None:
    shifted = _fed(num_clients=20, examples=400, shift=3.0, noise=0.1)
    plain = _fed(num_clients=20, examples=400, noise=0.1)
    # with a shift of std 3, a client's features sit away from the shared centres by about 3 per feature
    for cid in (0, 1):
        x, y = shifted.clients_train[cid].x.double(), shifted.clients_train[cid].y
        x0, y0 = plain.clients_train[cid].x.double(), plain.clients_train[cid].y
        centres = torch.from_numpy(load_dataset("synthetic_clients", seed=0).centres)
        offset = (x - centres[y]).mean(0)
        assert offset.std() > 1.5
        assert (x0 - centres[y0]).mean(0).abs().max() < 0.05
    iid = np.array([_fed(num_clients=200, examples=40).label_counts(c) for c in range(200)])
    skew = np.array(
        [_fed(num_clients=200, examples=40, partitioner="dirichlet", alpha=0.1).label_counts(c) for c in range(200)]
    )
    assert (iid.max(1) / iid.sum(1)).mean() < 0.45  # balanced shares: the largest class near a quarter
    assert (skew.max(1) / skew.sum(1)).mean() > 0.8  # Dir(0.1): most of a client's examples in one class


def test_size_spread_keeps_the_mean_and_test_subset_applies() -> None:
    fed = _fed(num_clients=4000, examples=20, size_spread=1.0, test_examples=500)
    sizes = np.array(fed.description()["train_examples"]) + np.array(fed.description()["held_out_examples"])
    assert sizes.min() >= 1 and sizes.max() > 60 and abs(sizes.mean() - 20) < 1.5
    assert len(fed.test) == 500 and torch.bincount(fed.test.y).tolist() == [125] * 4
    sub = federate(load_dataset("synthetic_clients", test_examples=500), num_clients=5, test_subset=100)
    assert len(sub.test) == 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"partitioner": "shards", "classes_per_client": 2},
            "data.partitioner: got 'shards', allowed: iid or dirichlet",
        ),
        ({"partitioner": "dirichlet"}, "data.alpha: got None"),
        ({"partitioner": "iid", "alpha": 0.5}, "data.alpha: got 0.5, allowed: unset with partitioner iid"),
        ({"partitioner": "dirichlet", "alpha": 0.5, "min_size": 3}, "data.min_size: got 3, allowed: unset"),
        ({"train_subset": 10}, "data.train_subset: got 10, allowed: unset"),
        ({"rotate_fraction": 0.5}, "data.rotate_fraction: got 0.5, allowed: 0"),
    ],
)
def test_options_it_cannot_honour_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        federate(load_dataset("synthetic_clients"), num_clients=5, **kwargs)


def test_bad_options_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"data.examples: got 0, allowed: an integer >= 1"):
        load_dataset("synthetic_clients", examples=0)
    with pytest.raises(ValueError, match=r"data.shift: got -1.0, allowed: >= 0"):
        load_dataset("synthetic_clients", shift=-1.0)
    with pytest.raises(TypeError, match="unknown option 'num_samples'"):
        load_dataset("synthetic_clients", num_samples=10)
    cfg = load_config(None, ["data.dataset=synthetic_clients", "data.partitioner=shards", "data.classes_per_client=2"])
    with pytest.raises(ConfigError, match="data.partitioner: got 'shards'"):
        load_federated(cfg)


def test_client_splits_check_what_they_make() -> None:
    made = ArrayDataset(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long))
    splits = ClientSplits(np.array([3, 4]), np.array([[3], [4]]), lambda cid: made)
    assert len(splits) == 2 and len(splits[0]) == 3 and len(splits[-2]) == 3 and len(splits[0:1]) == 1
    with pytest.raises(RuntimeError, match="client 1 was made with 3 examples, its size says 4"):
        splits[1]
    with pytest.raises(IndexError):
        splits[2]
    with pytest.raises(ValueError, match="2 sizes but 1 label-count rows"):
        ClientSplits(np.array([3, 4]), np.array([[3]]), lambda cid: made)


@pytest.mark.skipif(os.name != "posix", reason="fork-started workers")
def test_a_run_on_it_gives_the_same_bits_on_every_executor(tmp_path: Path) -> None:
    data = (
        "data.dataset=synthetic_clients",
        "data.options={examples: 15, shift: 0.3}",
        "data.partitioner=dirichlet",
        "data.alpha=0.5",
    )
    seq = finish(make_run(tmp_path, "sequential", "feddyn", *data))
    par = finish(make_run(tmp_path, "parallel", "feddyn", *data))
    assert_same_tensors(seq.params, par.params, "global params")
    assert comparable(seq.history) == comparable(par.history)
    assert seq.history[-1]["trained"] > 0


def test_a_large_population_costs_no_memory_per_client(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "data.dataset=synthetic_clients",
            "data.num_clients=200000",
            "model.name=mlp",
            "model.options={hidden: [8]}",
            "selection.clients_per_round=5",
            "rounds=1",
        ],
    )
    run = build_run(cfg, tmp_path / "big")
    fed = run.world.dataset
    # what the dataset holds per client: sizes and label counts (int64), no examples
    held = sum(a.nbytes for s in (fed.clients_train, fed.clients_test) for a in (s.sizes, s.label_counts))
    assert held <= 200000 * 2 * (1 + 4) * 8
    assert isinstance(fed.clients_train, ClientSplits)
