"""fedhet.training.losses: the proximal and linear terms, values and gradients by hand."""

import pytest
import torch
from torch import nn

from fedhet.training.losses import linear, proximal


def _model(w, b):
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([w]))
        m.bias.copy_(torch.tensor([b]))
    return m


def test_proximal_value_and_gradient():
    m = _model([1.0, 3.0], 0.5)
    anchor = {"weight": torch.tensor([[0.0, 1.0]]), "bias": torch.tensor([1.5])}
    term = proximal(anchor, mu=0.4)
    value = term(m)
    # (0.4/2) * ((1-0)^2 + (3-1)^2 + (0.5-1.5)^2) = 0.2 * 6 = 1.2
    assert value.item() == pytest.approx(1.2)
    value.backward()
    # mu * (theta - anchor)
    assert torch.allclose(m.weight.grad, torch.tensor([[0.4, 0.8]]))
    assert torch.allclose(m.bias.grad, torch.tensor([-0.4]))


def test_linear_value_and_gradient():
    m = _model([1.0, 3.0], 0.5)
    coeffs = {"weight": torch.tensor([[2.0, -1.0]]), "bias": torch.tensor([4.0])}
    value = linear(coeffs, scale=-1.0)(m)
    # -(1*2 + 3*(-1) + 0.5*4) = -1
    assert value.item() == pytest.approx(-1.0)
    value.backward()
    assert torch.equal(m.weight.grad, torch.tensor([[-2.0, 1.0]]))
    assert torch.equal(m.bias.grad, torch.tensor([-4.0]))
