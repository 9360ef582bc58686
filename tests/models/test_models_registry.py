import pytest
import torch
from torch import nn

import fedhet.core.registry as registry
from fedhet.core.messages import ModelSize
from fedhet.core.registry import MODELS
from fedhet.models import CNN, MLP, build_model
from fedhet.models._common import scale_width
from fedhet.models.cnn import cnn
from fedhet.models.mlp import mlp


@pytest.fixture
def models_only(monkeypatch):
    # Look models up without importing every other built-in module: this test is about the
    # models package, whose import alone registers its factories.
    monkeypatch.setattr(registry, "_loaded", True)


def test_models_are_registered_under_module_names(models_only):
    assert MODELS.get("mlp") is mlp
    assert MODELS.get("cnn") is cnn


def test_build_model_looks_up_the_registry(models_only):
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10, size=ModelSize(width=0.5))
    assert isinstance(model, CNN)
    assert model.channels == (16, 32) and model.hidden == 256
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, size=ModelSize(), hidden=(7,))
    assert isinstance(model, MLP)
    assert model.hidden == (7,)


def test_build_model_unknown_name(models_only):
    with pytest.raises(KeyError, match="unknown model 'nope'.*cnn, mlp"):
        build_model("nope", input_shape=(1, 8, 8), num_classes=10, size=ModelSize())


@pytest.mark.parametrize("factory", [mlp, cnn])
def test_unknown_option_is_a_type_error_naming_it(factory):
    with pytest.raises(TypeError, match="unknown option 'dropout'"):
        factory(input_shape=(1, 8, 8), num_classes=10, size=ModelSize(), dropout=0.5)


@pytest.mark.parametrize(
    ("channels", "width", "expected"),
    [(200, 1.0, 200), (200, 0.5, 100), (200, 0.0625, 13), (512, 0.0625, 32), (3, 0.25, 1), (200, 0.3, 60)],
)
def test_scale_width(channels, width, expected):
    # max(1, ceil(c * width)); 200 * 0.3 is 60.00000000000001 in floats but keeps 60 channels
    assert scale_width(channels, width) == expected


def test_state_dict_names_are_stable():
    m = cnn(input_shape=(3, 32, 32), num_classes=10, size=ModelSize())
    assert list(m.state_dict()) == [
        "convs.0.weight", "convs.0.bias", "convs.1.weight", "convs.1.bias",
        "fc.weight", "fc.bias", "head.weight", "head.bias",
    ]  # fmt: skip
    m = mlp(input_shape=(1, 8, 8), num_classes=10, size=ModelSize())
    assert list(m.state_dict()) == [
        "body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias", "head.weight", "head.bias",
    ]  # fmt: skip


def test_models_are_plain_modules():
    m = mlp(input_shape=(4,), num_classes=3, size=ModelSize(), hidden=(5,))
    assert isinstance(m, nn.Module)
    assert m(torch.zeros(2, 4)).shape == (2, 3)
