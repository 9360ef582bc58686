"""fedhet.algorithms.feddyn: server and client state updates by hand, and the local gradient."""

import pytest
import torch
from torch import nn

from fedhet.aggregation.mean import WeightedSum
from fedhet.algorithms.feddyn import STORE_KEY, FedDyn, FedDynState
from fedhet.core.algorithm import ServerSetup
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientTask, ModelSize
from fedhet.data.base import ArrayDataset
from fedhet.server_opt import fedavg as sgd
from fedhet.training.local import LocalTraining

ALPHA = 0.5


def _state(theta, h, num_clients):
    opt = sgd()
    trainable = frozenset(h)
    return FedDynState(theta, opt.init({n: theta[n] for n in trainable}), trainable, {"width": 1.0}, h, num_clients)


def _acc(*client_params):
    acc = WeightedSum("uniform")
    for p in client_params:
        acc.add_params(p, 1.0)
    return acc


def test_server_target_by_hand():
    theta = {"w": torch.tensor([1.0, 2.0]), "buf": torch.tensor([0.0])}
    state = _state(theta, {"w": torch.tensor([0.5, -0.5])}, num_clients=4)
    acc = _acc(
        {"w": torch.tensor([2.0, 4.0]), "buf": torch.tensor([2.0])},
        {"w": torch.tensor([4.0, 0.0]), "buf": torch.tensor([6.0])},
    )
    target, new = FedDyn(alpha=ALPHA).server_target(state, acc)
    # avg = [3, 2]; m/N = 2/4
    # h <- h - a (m/N)(avg - θ) = [0.5 - 0.5*0.5*2, -0.5 - 0.5*0.5*0] = [0, -0.5]
    assert torch.equal(new.h["w"], torch.tensor([0.0, -0.5]))
    # θ <- avg - h/a = [3 - 0, 2 + 1]
    assert torch.equal(target["w"], torch.tensor([3.0, 3.0]))
    # buffers take the plain average (2 + 6)/2
    assert torch.equal(target["buf"], torch.tensor([4.0]))
    assert torch.equal(state.h["w"], torch.tensor([0.5, -0.5]))  # the old state is untouched


def test_aggregate_applies_the_target_and_h_persists_across_rounds():
    alg = FedDyn(alpha=ALPHA)
    state = _state({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.5, -0.5])}, num_clients=4)
    state, metrics = alg.aggregate(state, 1, _acc({"w": torch.tensor([2.0, 4.0])}, {"w": torch.tensor([4.0, 0.0])}))
    assert torch.equal(state.params["w"], torch.tensor([3.0, 3.0]))
    assert metrics["aggregated_clients"] == 2.0
    # round 2: one client of 4 returns exactly θ = [3, 3]: h unchanged = [0, -0.5]; θ = [3, 3] - h/0.5 = [3, 4]
    state, _ = alg.aggregate(state, 2, _acc({"w": torch.tensor([3.0, 3.0])}))
    assert torch.equal(state.h["w"], torch.tensor([0.0, -0.5]))
    assert torch.equal(state.params["w"], torch.tensor([3.0, 4.0]))
    # round 3: one client of 4 returns [7, 4]: avg - θ = [4, 0]; h = [0 - 0.5*0.25*4, -0.5] = [-0.5, -0.5]
    # θ = [7, 4] - h/0.5 = [8, 5]
    state, _ = alg.aggregate(state, 3, _acc({"w": torch.tensor([7.0, 4.0])}))
    assert torch.equal(state.h["w"], torch.tensor([-0.5, -0.5]))
    assert torch.equal(state.params["w"], torch.tensor([8.0, 5.0]))


def test_init_zero_h_for_trainable_tensors_and_counts_all_clients():
    params = {"w": torch.ones(2, 2), "n": torch.tensor(0)}
    clients = [ClientInfo(c, 5, 1, "a", ModelSize()) for c in range(7)]
    setup = ServerSetup(params, frozenset({"w", "n"}), clients, ModelSize(), torch.Generator())
    state = FedDyn(alpha=ALPHA).init(setup)
    assert isinstance(state, FedDynState)
    assert state.num_clients == 7
    assert set(state.h) == {"w"} and torch.equal(state.h["w"], torch.zeros(2, 2))
    assert FedDyn().weighting == "uniform"


@pytest.mark.parametrize("alpha", [0.0, -0.1])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match=rf"algorithm.alpha: got {alpha!r}, allowed: > 0"):
        FedDyn(alpha=alpha)


def _model(w, b):
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([w]))
        m.bias.copy_(torch.tensor([b]))
    return m


def _ctx(model, store, data=None):
    data = data or ArrayDataset(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    info = ClientInfo(0, len(data), 0, "a", ModelSize())
    return ClientContext(
        info, data, data, lambda cfg: model, torch.device("cpu"), torch.Generator().manual_seed(0), store
    )


ANCHOR = {"weight": torch.tensor([[0.0, 1.0]]), "bias": torch.tensor([1.0])}
OLD_G = {"weight": torch.tensor([[0.25, 0.0]]), "bias": torch.tensor([1.0])}


def test_after_local_updates_the_gradient_state():
    model = _model([1.0, 2.0], 0.5)  # θ_k
    store = {STORE_KEY: {k: v.clone() for k, v in OLD_G.items()}}
    FedDyn(alpha=ALPHA).after_local(ClientTask(1, {}), _ctx(model, store), model, ANCHOR)
    # g <- g - a(θ_k - θ_g): weight [0.25 - 0.5*1, 0 - 0.5*1] ; bias 1 - 0.5*(0.5 - 1)
    assert torch.equal(store[STORE_KEY]["weight"], torch.tensor([[-0.25, -0.5]]))
    assert torch.equal(store[STORE_KEY]["bias"], torch.tensor([1.25]))


def test_after_local_starts_from_zero():
    model = _model([1.0, 2.0], 0.5)
    store = {}
    FedDyn(alpha=ALPHA).after_local(ClientTask(1, {}), _ctx(model, store), model, ANCHOR)
    assert torch.equal(store[STORE_KEY]["weight"], torch.tensor([[-0.5, -0.5]]))
    assert torch.equal(store[STORE_KEY]["bias"], torch.tensor([0.25]))


def test_loss_terms_gradient_is_minus_g_plus_alpha_times_drift():
    model = _model([1.0, 2.0], 0.5)
    terms = FedDyn(alpha=ALPHA).loss_terms(ClientTask(1, {}), _ctx(model, {STORE_KEY: OLD_G}), ANCHOR)
    sum(t(model) for t in terms).backward()
    # -g + a(θ - θ_g): weight [-0.25 + 0.5*1, 0 + 0.5*1] ; bias -1 + 0.5*(-0.5)
    assert torch.allclose(model.weight.grad, torch.tensor([[0.25, 0.5]]))
    assert torch.allclose(model.bias.grad, torch.tensor([-1.25]))


def test_first_round_has_only_the_proximal_term():
    model = _model([1.0, 2.0], 0.5)
    terms = FedDyn(alpha=ALPHA).loss_terms(ClientTask(1, {}), _ctx(model, {}), ANCHOR)
    assert len(terms) == 1
    terms[0](model).backward()
    assert torch.allclose(model.weight.grad, torch.tensor([[0.5, 0.5]]))


def test_local_update_stores_the_new_gradient_state():
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    anchor = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    data = ArrayDataset(torch.randn(12, 2, generator=g), torch.randint(0, 3, (12,), generator=g))
    store = {}
    res = FedDyn(alpha=ALPHA, local=LocalTraining(batch_size=4, lr=0.1)).local_update(
        ClientTask(1, anchor), _ctx(model, store, data)
    )
    assert set(store) == {STORE_KEY}
    for k in anchor:
        assert not torch.equal(res.params[k], anchor[k])
        torch.testing.assert_close(store[STORE_KEY][k], -ALPHA * (res.params[k] - anchor[k]), rtol=0, atol=1e-7)
