"""fedhet.core: result checks, parameter helpers, messages and the registry."""

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fedhet.core.algorithm import ClientError, check_result, describe, load_params, model_params, trainable_names
from fedhet.core.messages import ClientResult, ModelSize
from fedhet.core.registry import ALGORITHMS, Registry
from fedhet.core.types import clone_params, params_nbytes


def _expected():
    return {"w": torch.zeros(2, 3), "n": torch.tensor(0)}


def test_check_result_accepts_a_matching_result():
    check_result(_expected(), ClientResult({"w": torch.ones(2, 3), "n": torch.tensor(5)}, num_examples=0))


@pytest.mark.parametrize(
    "params, n, message",
    [
        ({"w": torch.ones(2, 3), "n": torch.tensor(1)}, -1, "num_examples is -1; allowed: >= 0"),
        ({"w": torch.ones(2, 3)}, 1, "missing ['n']"),
        ({"w": torch.ones(2, 3), "n": torch.tensor(1), "x": torch.ones(1)}, 1, "extra ['x']"),
        ({"w": torch.ones(3, 2), "n": torch.tensor(1)}, 1, "w: shape (3, 2), expected (2, 3)"),
        (
            {"w": torch.tensor([[1.0, math.nan, 0.0], [0.0, 0.0, 0.0]]), "n": torch.tensor(1)},
            1,
            "w: contains NaN or inf",
        ),
        ({"w": torch.full((2, 3), -math.inf), "n": torch.tensor(1)}, 1, "w: contains NaN or inf"),
    ],
)
def test_check_result_rejects(params, n, message):
    with pytest.raises(ClientError) as err:
        check_result(_expected(), ClientResult(params, num_examples=n))
    assert message in str(err.value)


def test_check_result_accepts_large_finite_values_whose_norm_overflows():
    # the norm of six values of 3e38 is above float32's largest (3.4e38): the check looks closer
    check_result(_expected(), ClientResult({"w": torch.full((2, 3), 3e38), "n": torch.tensor(1)}, num_examples=1))
    with pytest.raises(ClientError, match="w: contains NaN or inf"):
        w = torch.full((2, 3), 3e38)
        w[1, 2] = math.inf
        check_result(_expected(), ClientResult({"w": w, "n": torch.tensor(1)}, num_examples=1))


def test_model_params_are_detached_copies_with_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    params = model_params(model)
    assert set(params) == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    assert trainable_names(model) == frozenset({"0.weight", "0.bias", "1.weight", "1.bias"})
    params["0.weight"].fill_(3.0)
    assert not torch.equal(model[0].weight.detach(), params["0.weight"])
    assert not params["0.weight"].requires_grad
    load_params(model, params)
    assert torch.equal(model[0].weight.detach(), torch.full((2, 2), 3.0))
    del params["1.running_mean"]
    with pytest.raises(RuntimeError):
        load_params(model, params)  # strict: every state-dict entry must be present


def test_clone_and_nbytes():
    p = {
        "a": torch.zeros(3, dtype=torch.float32),
        "b": torch.zeros(2, dtype=torch.float64),
        "c": torch.zeros(5, dtype=torch.int64),
    }
    assert params_nbytes(p) == 3 * 4 + 2 * 8 + 5 * 8
    c = clone_params(p)
    c["a"][0] = 1.0
    assert p["a"][0] == 0.0


@pytest.mark.parametrize(
    "kwargs, field",
    [({"width": 0.0}, "width"), ({"width": 1.5}, "width"), ({"depth": 0}, "depth"), ({"density": 0.0}, "density")],
)
def test_model_size_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"ModelSize\.{field}: got"):
        ModelSize(**kwargs)


def test_model_size_scale_orders_sizes():
    assert ModelSize(width=0.5).scale() < ModelSize().scale()
    assert ModelSize(depth=2).scale() < ModelSize(depth=3).scale() < ModelSize().scale()
    assert ModelSize(width=0.5, depth=2, density=0.5).as_config() == {"width": 0.5, "depth": 2, "density": 0.5}


def test_describe_nests_dataclasses():
    @dataclass(frozen=True)
    class Inner:
        a: int = 1

    @dataclass(frozen=True)
    class Outer:
        inner: Inner = Inner()
        b: float = 0.5

    assert describe(Outer()) == {"inner": {"a": 1}, "b": 0.5}


def test_registry_errors():
    reg = Registry("widget")
    reg.register("a")(int)
    reg.register("a")(int)  # the same object again is fine
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a")(float)
    with pytest.raises(KeyError, match="unknown widget 'b'; allowed: a"):
        reg.get("b")
    assert reg.names() == ["a"] and "a" in reg and list(reg) == ["a"]
    assert {"fedavg", "fedprox", "feddyn", "local"} <= set(ALGORITHMS.names())


def test_load_params_for_loads_once_per_evaluation_pass():
    from fedhet.core.algorithm import load_params_for

    model = nn.Linear(2, 1)
    loads = []
    model.register_load_state_dict_post_hook(lambda module, keys: loads.append(1))
    p = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
    q = {"weight": torch.full((1, 2), 2.0), "bias": torch.zeros(1)}
    first, second = object(), object()
    load_params_for(model, p, first)
    load_params_for(model, p, first)  # the same dict in the same pass: not loaded again
    assert len(loads) == 1
    load_params_for(model, q, first)  # another dict: loaded
    assert len(loads) == 2 and torch.equal(model.weight.detach(), q["weight"])
    load_params_for(model, q, second)  # another pass: loaded
    assert len(loads) == 3
    with torch.no_grad():
        model.weight.add_(1.0)  # what training does between passes, after load_params
    load_params(model, q)
    load_params_for(model, q, second)  # load_params in between forgets what the pass loaded
    assert len(loads) == 5
    load_params_for(model, q, None)
    load_params_for(model, q, None)  # outside a pass: always loaded
    assert len(loads) == 7


def test_load_params_copies_as_load_state_dict_does_and_keeps_its_errors() -> None:
    from fedhet.core.algorithm import load_params

    class OwnLoader(torch.nn.Linear):
        loads = 0

        def _load_from_state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003
            OwnLoader.loads += 1
            super()._load_from_state_dict(*args, **kwargs)

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    source = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    source[1].running_mean.add_(2.0)
    source[1].num_batches_tracked.add_(5)
    params = {k: v.clone() for k, v in source.state_dict().items()}
    weight = model[0].weight
    load_params(model, params)
    assert model[0].weight is weight  # in place
    for name, value in model.state_dict().items():
        assert torch.equal(value, params[name]) and value.data_ptr() != params[name].data_ptr(), name
    # float64 values are cast like load_state_dict casts them
    load_params(model, {k: (v.double() if v.is_floating_point() else v) for k, v in params.items()})
    assert model[0].weight.dtype == torch.float32 and torch.equal(model[0].weight, params["0.weight"])
    # a module with its own loader is loaded by it
    own = torch.nn.Sequential(OwnLoader(3, 4))
    load_params(own, {"0.weight": torch.ones(4, 3), "0.bias": torch.zeros(4)})
    assert OwnLoader.loads == 1 and torch.equal(own[0].weight, torch.ones(4, 3))
    with pytest.raises(RuntimeError, match='Missing key\\(s\\) in state_dict: "0.bias"'):
        load_params(model, {k: v for k, v in params.items() if k != "0.bias"})
    with pytest.raises(RuntimeError, match="size mismatch for 0.weight"):
        load_params(model, {**params, "0.weight": torch.zeros(4, 2)})
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "extra"'):
        load_params(model, {**params, "extra": torch.zeros(1)})
