import torch
from torch import nn

from fedhet.core.messages import ModelSize
from fedhet.models.cnn import cnn
from fedhet.models.cost import ModelCost, count_params, flops_per_sample, model_cost, state_nbytes


def test_linear_flops_are_two_per_multiply_add():
    assert flops_per_sample(nn.Linear(4, 3), (4,)) == 2 * 4 * 3


def test_count_params_skips_frozen():
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    m[0].weight.requires_grad_(False)
    assert count_params(m) == 3 + (3 * 2 + 2)


def test_state_nbytes_includes_buffers():
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    # linear 15 floats, BN weight+bias+running_mean+running_var 12 floats (4 bytes each),
    # num_batches_tracked one int64 (8 bytes)
    assert state_nbytes(m) == (15 + 12) * 4 + 8
    assert count_params(m) == 15 + 6


def test_flops_restore_training_mode_per_module():
    m = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    m.train()
    m[1].eval()
    flops_per_sample(m, (4,))
    assert m.training is True and m[0].training is True and m[1].training is False


def test_flops_leave_no_grad_state():
    m = nn.Linear(2, 2)
    flops_per_sample(m, (2,))
    assert torch.is_grad_enabled()


def test_cnn_flops_on_8x8():
    m = cnn(input_shape=(1, 8, 8), num_classes=10, size=ModelSize())
    expected = (
        2 * (8 * 8) * 32 * (1 * 5 * 5)  # conv1 at 8x8
        + 2 * (4 * 4) * 64 * (32 * 5 * 5)  # conv2 at 4x4 (after pooling)
        + 2 * (64 * 2 * 2) * 512  # fc
        + 2 * 512 * 10  # head
    )
    assert flops_per_sample(m, (1, 8, 8)) == expected


def test_model_cost_bundles_the_three():
    m = nn.Linear(4, 3)
    assert model_cost(m, (4,)) == ModelCost(params=15, state_bytes=15 * 4, flops_per_sample=24)
