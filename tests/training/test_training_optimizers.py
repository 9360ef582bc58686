"""LocalTraining.optimizer: sgd / adam / adamw, their hyperparameters, one hand-checked AdamW round,
and the config field."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedhet.data.base import ArrayDataset
from fedhet.training.local import OPTIMIZERS, LocalTraining, train


def _params():
    return list(nn.Linear(3, 2).parameters())


def test_optimizers_listed():
    assert OPTIMIZERS == ("sgd", "adam", "adamw")
    assert LocalTraining().optimizer == "sgd"


def test_sgd_is_the_default_with_momentum_weight_decay_and_scheduled_lr():
    spec = LocalTraining(lr=0.1, lr_decay=0.5, momentum=0.9, weight_decay=1e-3, lr_milestones=(3,), lr_gamma=0.1)
    opt = spec.make_optimizer(_params(), rnd=3)
    assert type(opt) is torch.optim.SGD
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(spec.lr_at(3)) and spec.lr_at(3) == pytest.approx(0.1 * 0.25 * 0.1)
    assert group["momentum"] == 0.9 and group["weight_decay"] == 1e-3
    assert group["nesterov"] is False and group["dampening"] == 0
    plain = LocalTraining().make_optimizer(_params(), rnd=1).param_groups[0]
    assert plain["lr"] == 0.05 and plain["momentum"] == 0.0 and plain["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "name, cls, decoupled", [("adam", torch.optim.Adam, False), ("adamw", torch.optim.AdamW, True)]
)
def test_adam_and_adamw(name, cls, decoupled):
    spec = LocalTraining(optimizer=name, lr=1e-3, lr_decay=0.9, weight_decay=0.01, momentum=0.5)
    params = _params()
    opt = spec.make_optimizer(params, rnd=2)
    assert type(opt) is cls  # AdamW subclasses Adam: the exact class matters
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(1e-3 * 0.9)
    assert group["weight_decay"] == 0.01
    assert group["betas"] == (0.9, 0.999)  # torch defaults; SGD's momentum does not leak in
    assert group.get("decoupled_weight_decay", decoupled) is decoupled
    assert [id(p) for p in group["params"]] == [id(p) for p in params]
    assert not opt.state  # moments start afresh


def test_adamw_without_weight_decay_gets_none():
    # torch's own AdamW default is 0.01; local.weight_decay (default 0) is passed on as is
    group = LocalTraining(optimizer="adamw").make_optimizer(_params(), rnd=1).param_groups[0]
    assert group["weight_decay"] == 0.0


@pytest.mark.parametrize("bad", ["rmsprop", "AdamW", "", None])
def test_bad_optimizer_names_the_field(bad):
    with pytest.raises(ValueError, match=r"local\.optimizer: got .*allowed: sgd, adam, adamw"):
        LocalTraining(optimizer=bad)


def _data(n: int = 10) -> ArrayDataset:
    g = torch.Generator().manual_seed(1)
    return ArrayDataset(torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g))


def _model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # the same weights every call, global RNG untouched
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _hand_run(model: nn.Module, data: ArrayDataset, opt_cls, seed: int, batch_size: int, steps: int, **opt_kw):
    """What ``train`` should do: one randperm from the generator per epoch, batches cut from it in
    order, loss → zero_grad → backward → step."""
    opt = opt_cls(model.parameters(), **opt_kw)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    losses = []
    for s in range(steps):
        idx = order[s * batch_size : (s + 1) * batch_size]
        loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
        losses.append(float(loss.detach()) * len(idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return sum(losses) / (steps * batch_size)


@pytest.mark.parametrize("steps", [1, 2])
def test_train_with_adamw_matches_a_hand_run_adamw(steps):
    data = _data()
    model = _model()
    ref = copy.deepcopy(model)
    spec = LocalTraining(optimizer="adamw", lr=0.01, lr_decay=0.5, weight_decay=0.1, batch_size=4, max_steps=steps)
    stats = train(model, data, spec, torch.Generator().manual_seed(7), rnd=2)
    ref_loss = _hand_run(ref, data, torch.optim.AdamW, 7, 4, steps, lr=0.005, weight_decay=0.1)
    assert stats.steps == steps and stats.examples == 4 * steps
    assert stats.loss == pytest.approx(ref_loss, rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)

    # the check can tell the optimizers apart: coupled Adam or SGD land elsewhere
    for cls, kw in (
        (torch.optim.Adam, {"lr": 0.005, "weight_decay": 0.1}),
        (torch.optim.SGD, {"lr": 0.005, "weight_decay": 0.1}),
    ):
        other = _model()
        _hand_run(other, data, cls, 7, 4, steps, **kw)
        assert any(not torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(model.parameters(), other.parameters()))
    # and the batch order: another seed lands elsewhere
    other = _model()
    _hand_run(other, data, torch.optim.AdamW, 8, 4, steps, lr=0.005, weight_decay=0.1)
    assert any(not torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(model.parameters(), other.parameters()))


def test_train_with_adam_matches_a_hand_run_adam():
    data = _data()
    model = _model()
    ref = copy.deepcopy(model)
    spec = LocalTraining(optimizer="adam", lr=0.02, weight_decay=0.05, batch_size=3, max_steps=2)
    train(model, data, spec, torch.Generator().manual_seed(3))
    _hand_run(ref, data, torch.optim.Adam, 3, 3, 2, lr=0.02, weight_decay=0.05)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_config_accepts_adamw_and_rejects_rmsprop():
    from fedhet.experiment.build import build_algorithm
    from fedhet.experiment.config import ConfigError, load_config

    cfg = load_config(None, ["local.optimizer=adamw", "local.weight_decay=0.01"])
    assert cfg.local.optimizer == "adamw"
    local = build_algorithm(cfg).local
    assert isinstance(local, LocalTraining) and local.optimizer == "adamw" and local.weight_decay == 0.01
    assert load_config(None, []).local.optimizer == "sgd"

    with pytest.raises(
        ConfigError, match=r"local\.optimizer: got 'rmsprop', allowed: .*'sgd', 'adam' or 'adamw'"
    ) as err:
        load_config(None, ["local.optimizer=rmsprop"])
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
