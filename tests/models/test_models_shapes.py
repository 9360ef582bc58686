import pytest
import torch

from fedhet.core.messages import ModelSize
from fedhet.models.cnn import cnn
from fedhet.models.cost import count_params
from fedhet.models.mlp import mlp

SHAPES = [(1, 8, 8), (3, 32, 32)]
WIDTHS = [1.0, 0.5, 0.25]


@pytest.mark.parametrize("factory", [mlp, cnn])
@pytest.mark.parametrize("input_shape", SHAPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_output_has_every_class(factory, input_shape, width):
    model = factory(input_shape=input_shape, num_classes=10, size=ModelSize(width=width))
    out = model(torch.zeros(2, *input_shape))
    assert out.shape == (2, 10)


@pytest.mark.parametrize(
    ("width", "channels", "fc_in", "hidden"),
    [(1.0, (32, 64), 64 * 8 * 8, 512), (0.5, (16, 32), 32 * 8 * 8, 256), (0.25, (8, 16), 16 * 8 * 8, 128)],
)
def test_cnn_layer_shapes_on_32x32(width, channels, fc_in, hidden):
    m = cnn(input_shape=(3, 32, 32), num_classes=10, size=ModelSize(width=width))
    assert m.convs[0].weight.shape == (channels[0], 3, 5, 5)
    assert m.convs[1].weight.shape == (channels[1], channels[0], 5, 5)
    assert m.fc.weight.shape == (hidden, fc_in)
    assert m.head.weight.shape == (10, hidden)


def test_cnn_on_8x8_digits_reaches_fc_as_2x2():
    m = cnn(input_shape=(1, 8, 8), num_classes=10, size=ModelSize())
    assert m.fc.weight.shape == (512, 64 * 2 * 2)


def test_cnn_param_count_full_width_cifar():
    m = cnn(input_shape=(3, 32, 32), num_classes=10, size=ModelSize())
    expected = (
        (3 * 32 * 5 * 5 + 32)  # conv1
        + (32 * 64 * 5 * 5 + 64)  # conv2
        + (64 * 8 * 8 * 512 + 512)  # fc
        + (512 * 10 + 10)  # head
    )
    assert expected == 2_156_490
    assert count_params(m) == expected


def test_cnn_param_count_half_width_cifar():
    m = cnn(input_shape=(3, 32, 32), num_classes=10, size=ModelSize(width=0.5))
    expected = (
        (3 * 16 * 5 * 5 + 16)  # conv1: 16 channels
        + (16 * 32 * 5 * 5 + 32)  # conv2: 32 channels
        + (32 * 8 * 8 * 256 + 256)  # fc: 256 units
        + (256 * 10 + 10)  # head keeps all 10 classes
    )
    assert expected == 541_162
    assert count_params(m) == expected


def test_mlp_param_count_and_widths():
    m = mlp(input_shape=(1, 8, 8), num_classes=10, size=ModelSize(width=0.25))
    assert m.hidden == (50, 50)
    assert count_params(m) == (64 * 50 + 50) + (50 * 50 + 50) + (50 * 10 + 10)


def test_mlp_tiny_width_keeps_one_unit():
    m = mlp(input_shape=(4,), num_classes=3, size=ModelSize(width=0.0625), hidden=(4, 8))
    assert m.hidden == (1, 1)


def test_cnn_custom_options():
    m = cnn(input_shape=(1, 28, 28), num_classes=62, size=ModelSize(), channels=(4,), hidden=6)
    assert m.convs[0].weight.shape == (4, 1, 5, 5)
    assert m.fc.weight.shape == (6, 4 * 14 * 14)
    assert m(torch.zeros(1, 1, 28, 28)).shape == (1, 62)


def test_cnn_input_too_small():
    with pytest.raises(ValueError, match="too small"):
        cnn(input_shape=(1, 3, 3), num_classes=10, size=ModelSize())


def test_cnn_needs_channels_height_width():
    with pytest.raises(ValueError, match="3 dimensions"):
        cnn(input_shape=(8, 8), num_classes=10, size=ModelSize())


@pytest.mark.parametrize("bad", [(0,), (200, -1), "200", 3.5])
def test_mlp_bad_hidden(bad):
    with pytest.raises(ValueError, match="hidden"):
        mlp(input_shape=(4,), num_classes=3, size=ModelSize(), hidden=bad)
