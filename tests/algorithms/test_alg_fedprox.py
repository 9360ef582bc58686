"""fedhet.algorithms.fedprox: the proximal gradient by hand, and μ pulling local models to the anchor."""

import pytest
import torch
from torch import nn

from fedhet.algorithms.fedprox import FedProx
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientTask, ModelSize
from fedhet.data.base import ArrayDataset
from fedhet.training.local import LocalTraining


def _ctx(model, data):
    info = ClientInfo(0, len(data), 0, "a", ModelSize())
    return ClientContext(info, data, data, lambda cfg: model, torch.device("cpu"), torch.Generator().manual_seed(0), {})


def _line(w):
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(w)
    return m


def test_loss_plus_proximal_gradient_by_hand():
    mu, w, w0 = 0.3, 2.0, 0.5
    model = _line(w)
    alg = FedProx(mu=mu)
    data = ArrayDataset(torch.tensor([[3.0]]), torch.tensor([[1.0]]))
    terms = alg.loss_terms(ClientTask(1, {}), _ctx(model, data), {"weight": torch.tensor([[w0]])})
    assert len(terms) == 1
    loss = (model(data.x) - data.y).pow(2).sum() + terms[0](model)
    loss.backward()
    # d/dw (w*3 - 1)^2 = 2*(6 - 1)*3 = 30 ; d/dw (mu/2)(w - w0)^2 = mu*(w - w0) = 0.3*1.5 = 0.45
    assert model.weight.grad.item() == pytest.approx(30.0 + 0.45, abs=1e-5)
    # the term's value: (0.3/2) * 1.5^2 = 0.3375
    assert terms[0](model).item() == pytest.approx(0.3375, abs=1e-7)


def test_mu_zero_adds_no_term_and_negative_mu_is_rejected():
    assert FedProx(mu=0.0).loss_terms(ClientTask(1, {}), None, {}) == []
    with pytest.raises(ValueError, match=r"algorithm.mu: got -0.1, allowed: >= 0"):
        FedProx(mu=-0.1)


def _local_distance(mu):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    anchor = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    data = ArrayDataset(torch.randn(32, 4, generator=g) * 3, torch.randint(0, 3, (32,), generator=g))
    # lr * mu = 1: each step lands on the anchor minus lr times the data gradient
    alg = FedProx(mu=mu, local=LocalTraining(epochs=5, batch_size=8, lr=0.1))
    res = alg.local_update(ClientTask(1, anchor), _ctx(model, data))
    return sum(float((res.params[k] - anchor[k]).pow(2).sum()) for k in anchor) ** 0.5


def test_large_mu_keeps_the_local_model_near_the_anchor():
    free = _local_distance(0.0)
    tied = _local_distance(10.0)
    assert free > 0.5
    assert tied < 0.25 * free
