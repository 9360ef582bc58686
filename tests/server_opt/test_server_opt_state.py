"""Transformations and their states survive pickling, and a resumed run gives the same bits."""

import dataclasses
import pickle

import pytest
import torch

import fedhet.core.registry as registry
from fedhet.core.registry import SERVER_OPTIMIZERS
from fedhet.server_opt import (
    AddNoise,
    ClipByGlobalNorm,
    GradientTransformation,
    Masked,
    Scale,
    ScaleByAdagrad,
    ScaleByAdam,
    ScaleByMomentum,
    ScaleByYogi,
    apply_updates,
    build_server_optimizer,
    chain,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedyogi,
    pseudo_gradient,
)

TRANSFORMS = [
    Scale(-0.5),
    ClipByGlobalNorm(1.0),
    AddNoise(std=0.1, seed=3),
    ScaleByMomentum(0.9),
    ScaleByMomentum(0.9, nesterov=True),
    ScaleByAdam(),
    ScaleByYogi(),
    ScaleByAdagrad(b1=0.5),
    Masked(ScaleByAdam(), frozenset({"w"})),
    chain(ClipByGlobalNorm(2.0), ScaleByMomentum(0.5), Scale(-1.0)),
    fedavg(),
    fedavgm(),
    fedadam(),
    fedyogi(),
    fedadagrad(),
]


@pytest.fixture
def server_opt_only(monkeypatch):
    monkeypatch.setattr(registry, "_loaded", True)


def tree_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(tree_equal(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(
            tree_equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    return a == b


def params():
    return {"w": torch.tensor([1.0, -2.0, 0.5]), "b": torch.tensor([0.25])}


def aggregates(n):
    gen = torch.Generator().manual_seed(11)
    return [{"w": torch.randn(3, generator=gen), "b": torch.randn(1, generator=gen)} for _ in range(n)]


def server_round(opt, state, glob, agg):
    updates, state = opt.update(pseudo_gradient(glob, agg), state, glob)
    return apply_updates(glob, updates), state


@pytest.mark.parametrize("opt", TRANSFORMS, ids=repr)
def test_transformation_is_a_frozen_dataclass(opt):
    assert isinstance(opt, GradientTransformation)
    assert dataclasses.is_dataclass(opt)
    field = dataclasses.fields(opt)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(opt, field, None)
    assert not vars(opt).keys() - {f.name for f in dataclasses.fields(opt)}  # nothing kept on self
    hash(opt)


@pytest.mark.parametrize("opt", TRANSFORMS, ids=repr)
def test_transformation_and_state_pickle(opt):
    glob = params()
    state = opt.init(glob)
    _, state = opt.update(pseudo_gradient(glob, aggregates(1)[0]), state, glob)
    opt2 = pickle.loads(pickle.dumps(opt))
    state2 = pickle.loads(pickle.dumps(state))
    assert opt2 == opt
    assert tree_equal(state2, state)
    g = pseudo_gradient(glob, aggregates(2)[1])
    u_a, s_a = opt.update(g, state, glob)
    u_b, s_b = opt2.update(g, state2, glob)
    assert tree_equal(u_a, u_b) and tree_equal(s_a, s_b)


@pytest.mark.parametrize(
    "name,hparams",
    [
        ("fedavg", {}),
        ("fedavgm", {"momentum": 0.5}),
        ("fedadam", {"lr": 0.1}),
        ("fedyogi", {"lr": 0.1}),
        ("fedadagrad", {"lr": 0.1, "b1": 0.5}),
    ],
)
def test_resume_gives_identical_bits(server_opt_only, name, hparams):
    opt = build_server_optimizer(name, clip=1.0, noise_std=0.01, seed=5, **hparams)
    aggs = aggregates(3)

    glob, state = params(), opt.init(params())
    for agg in aggs:
        glob, state = server_round(opt, state, glob, agg)

    glob_r, state_r = params(), opt.init(params())
    glob_r, state_r = server_round(opt, state_r, glob_r, aggs[0])
    blob = pickle.dumps((opt, state_r, glob_r))
    opt_r, state_r, glob_r = pickle.loads(blob)
    for agg in aggs[1:]:
        glob_r, state_r = server_round(opt_r, state_r, glob_r, agg)

    assert tree_equal(glob_r, glob)
    assert tree_equal(state_r, state)
    assert state[1].step == 3  # the noise counter counted every round


def test_every_registered_preset_builds_a_picklable_frozen_transformation(server_opt_only):
    for name, preset in SERVER_OPTIMIZERS.items():
        opt = preset()
        assert dataclasses.is_dataclass(opt) and opt.__dataclass_params__.frozen, name
        assert pickle.loads(pickle.dumps(opt)) == opt, name
        state = opt.init(params())
        assert tree_equal(pickle.loads(pickle.dumps(state)), state), name
