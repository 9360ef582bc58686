"""fedhet.algorithms.qffl: the q-FedAvg step by hand for q = 0, 1, 2, F_k taken at the received
model before training, merging partial accumulators, validation, and end-to-end runs."""

import json
import math

import pytest
import torch
from torch import nn

from fedhet.algorithms.fedavg import FedAvg
from fedhet.algorithms.qffl import QFFL, QfflSum, qffl_terms
from fedhet.core.algorithm import ClientError, ServerSetup
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask, ModelSize
from fedhet.data.base import ArrayDataset
from fedhet.data.tasks import Regression
from fedhet.experiment.build import build_run
from fedhet.experiment.config import ConfigError, load_config
from fedhet.simulation.loop import run_rounds
from fedhet.training.local import LocalTraining

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(params, trainable):
    return ServerSetup(
        params=params, trainable=frozenset(trainable), clients=[], global_size=ModelSize(), generator=torch.Generator()
    )


def _result(w, w_bar, loss, q, lr, buffer, n):
    """What a client reports, computed here by hand from F_k and w̄_k (no eps)."""
    L = 1.0 / lr
    dw = {k: L * (w[k] - w_bar[k]) for k in w}
    sq = sum(float((v * v).sum()) for v in dw.values())
    scale = loss**q
    h = L * scale + (q * loss ** (q - 1) * sq if q else 0.0)
    params = {k: v * scale for k, v in dw.items()}
    params["bn.running_mean"] = torch.tensor(buffer)
    extras = {"h": torch.tensor(h, dtype=torch.float64), "loss": torch.tensor(loss, dtype=torch.float64)}
    return ClientResult(params, num_examples=n, extras=extras), h


# w = (1, -1); lr 0.5, so L = 2.
# client 1: F = 1, w̄ = (0.5, -1)  -> Δw = (1, 0),  ‖Δw‖² = 1
# client 2: F = 4, w̄ = (2, 0)     -> Δw = (-2, -2), ‖Δw‖² = 8
# q = 0: Δ = Δw, h = L = 2 each; Σh = 4; ΣΔ = (-1, -2)  -> w = (1.25, -0.5) = mean of the w̄
# q = 1: Δ1 = (1, 0), Δ2 = 4·(-2, -2) = (-8, -8); h1 = 1·1 + 2·1 = 3, h2 = 1·8 + 2·4 = 16;
#        Σh = 19, ΣΔ = (-7, -8) -> w = (1 + 7/19, -1 + 8/19)
# q = 2: Δ1 = (1, 0), Δ2 = 16·(-2, -2) = (-32, -32); h1 = 2·1·1 + 2·1 = 4, h2 = 2·4·8 + 2·16 = 96;
#        Σh = 100, ΣΔ = (-31, -32) -> w = (1.31, -0.68)
EXPECTED = {0: ((1.25, -0.5), 4.0), 1: ((1 + 7 / 19, -1 + 8 / 19), 19.0), 2: ((1 + 31 / 100, -1 + 32 / 100), 100.0)}


@pytest.mark.parametrize("q", [0, 1, 2])
def test_server_step_by_hand(q):
    lr = 0.5
    alg = QFFL(q=q, local=LocalTraining(lr=lr))
    params = {"w": torch.tensor([1.0, -1.0]), "bn.running_mean": torch.tensor([0.0]), "bn.num_batches_tracked": torch.tensor(0)}
    state = alg.init(_setup(params, ["w", "bn.num_batches_tracked"]))
    assert state.trainable == frozenset({"w"})  # integer tensors are never stepped
    infos = [ClientInfo(c, 10, 2, "a", ModelSize()) for c in (1, 2)]
    tasks = alg.configure(state, 3, infos)
    acc = alg.accumulator(state, 3)
    w = {"w": state.params["w"]}
    r1, h1 = _result(w, {"w": torch.tensor([0.5, -1.0])}, 1.0, q, lr, [2.0], n=1)
    r2, h2 = _result(w, {"w": torch.tensor([2.0, 0.0])}, 4.0, q, lr, [6.0], n=3)
    for cid, r in ((1, r1), (2, r2)):
        r.params["bn.num_batches_tracked"] = torch.tensor(4 * cid)
        alg.validate_result(tasks[cid], r)
        acc.add(cid, tasks[cid], r)
    new, metrics = alg.aggregate(state, 3, acc)

    want, h_sum = EXPECTED[q]
    assert h1 + h2 == h_sum
    assert torch.equal(new.params["w"], torch.tensor(want, dtype=torch.float64).float())
    # buffers: the example-weighted mean, (1·2 + 3·6)/4 = 5 ; (1·4 + 3·8)/4 = 7
    assert torch.equal(new.params["bn.running_mean"], torch.tensor([5.0]))
    assert torch.equal(new.params["bn.num_batches_tracked"], torch.tensor(7))
    assert metrics == {"aggregated_clients": 2.0, "qffl_h_sum": h_sum, "qffl_loss_mean": 2.5, "qffl_loss_max": 4.0}
    assert torch.equal(state.params["w"], torch.tensor([1.0, -1.0]))  # the old state is not modified

    same, metrics = alg.aggregate(state, 4, alg.accumulator(state, 4))
    assert same is state and metrics == {"aggregated_clients": 0.0}


def test_q_zero_is_the_uniform_mean_of_the_local_models():
    torch.manual_seed(0)
    alg = QFFL(q=0.0, local=LocalTraining(lr=0.1))
    state = alg.init(_setup({"w": torch.randn(3, 2)}, ["w"]))
    acc = alg.accumulator(state, 1)
    bars = [torch.randn(3, 2) for _ in range(3)]
    for cid, (bar, loss) in enumerate(zip(bars, [0.1, 2.0, 7.0], strict=True)):
        res, _ = _result({"w": state.params["w"]}, {"w": bar}, loss, 0.0, 0.1, [0.0], n=cid + 1)
        acc.add(cid, ClientTask(1, state.params), res)
    new, _ = alg.aggregate(state, 1, acc)
    torch.testing.assert_close(new.params["w"], sum(bars) / 3, rtol=0, atol=1e-6)


def test_partial_accumulators_merge_to_the_same_bits():
    g = torch.Generator().manual_seed(3)
    alg = QFFL(q=1.5)
    state = alg.init(_setup({"w": torch.randn(4, 3, generator=g), "bn.running_mean": torch.zeros(3)}, ["w"]))
    results = []
    for cid in range(5):
        bar = {"w": state.params["w"] + 0.01 * torch.randn(4, 3, generator=g)}
        loss = float(torch.rand(1, generator=g)) * 3
        results.append(_result({"w": state.params["w"]}, bar, loss, 1.5, 0.05, [float(cid)] * 3, n=cid + 2)[0])
    whole = alg.accumulator(state, 1)
    for cid, r in enumerate(results):
        whole.add(cid, ClientTask(1, state.params), r)
    parts = [alg.accumulator(state, 1).empty() for _ in range(2)]
    for cid in (4, 1, 3):
        parts[0].add(cid, ClientTask(1, state.params), results[cid])
    for cid in (2, 0):
        parts[1].add(cid, ClientTask(1, state.params), results[cid])
    merged = alg.accumulator(state, 1)
    merged.merge(parts[1])
    merged.merge(parts[0])
    a, _ = alg.aggregate(state, 1, whole)
    b, _ = alg.aggregate(state, 1, merged)
    for n in a.params:
        assert torch.equal(a.params[n], b.params[n])
    assert isinstance(merged, QfflSum) and merged.count == 5


# -- the client -----------------------------------------------------------------------------------
def _line(w, dropout=0.0):
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(w)
    return nn.Sequential(nn.Dropout(dropout), lin)


def _ctx(model, target, cid=0):
    data = ArrayDataset(torch.tensor([[1.0]]), torch.tensor([target]), Regression())
    info = ClientInfo(cid, 1, 1, "a", ModelSize())
    return ClientContext(info, data, data, lambda cfg: model, torch.device("cpu"), torch.Generator().manual_seed(0), {})


# Model y = w·x at w = 3, one example x = 1, MSE loss (w·x − y)², one full-batch SGD step with
# lr 0.25 (L = 4). Client A (y = 1): F = 4, gradient 4, w̄ = 2, Δw = 4. Client B (y = 2): F = 1,
# gradient 2, w̄ = 2.5, Δw = 2.
# q = 0: Δ = (4, 2), h = (4, 4)                               -> w = 3 − 6/8 = 2.25
# q = 1: Δ = (16, 2), h = (1·16 + 4·4, 1·4 + 4·1) = (32, 8)     -> w = 3 − 18/40 = 2.55
# q = 2: Δ = (64, 2), h = (2·4·16 + 4·16, 2·4 + 4) = (192, 12)  -> w = 3 − 66/204
CLIENT_CASES = {0: ((4.0, 2.0), (4.0, 4.0), 2.25), 1: ((16.0, 2.0), (32.0, 8.0), 2.55), 2: ((64.0, 2.0), (192.0, 12.0), 3 - 66 / 204)}


@pytest.mark.parametrize("q", [0, 1, 2])
def test_clients_and_server_by_hand(q):
    alg = QFFL(q=q, eps=0.0, local=LocalTraining(lr=0.25, batch_size=1))
    start = {"1.weight": torch.tensor([[3.0]])}
    state = alg.init(_setup(start, ["1.weight"]))
    acc = alg.accumulator(state, 1)
    deltas, hs, want = CLIENT_CASES[q]
    for cid, (target, loss) in enumerate(((1.0, 4.0), (2.0, 1.0))):
        task = ClientTask(1, state.params)
        res = alg.local_update(task, _ctx(_line(3.0), target, cid))
        alg.validate_result(task, res)
        # F_k is the loss at the received w = 3, before training (after training it would be 1 or 0.25)
        assert float(res.extras["loss"]) == loss and res.metrics["qffl_loss"] == loss
        assert res.params["1.weight"].item() == deltas[cid]
        assert res.params["1.weight"].dtype == torch.float32
        assert float(res.extras["h"]) == hs[cid] == res.metrics["qffl_h"]
        assert res.num_examples == 1 and res.metrics["steps"] == 1.0
        acc.add(cid, task, res)
    new, _ = alg.aggregate(state, 1, acc)
    assert new.params["1.weight"].item() == torch.tensor(want, dtype=torch.float32).item()


def test_converges_to_the_q_ffl_optimum_and_larger_q_is_fairer():
    """Three clients fit y = w with targets 0, 0, 3 (F_k = (w − y_k)²), one local step each round.
    q-FedAvg's fixed point solves Σ_k F_k^q ∇F_k = 0, the stationary point of Σ_k F_k^{q+1}/(q+1):
    2·w^{2q+1} = (3 − w)^{2q+1}, so w* = 3 / (1 + 2^{1/(2q+1)}): 1 for q = 0 (the mean), moving
    towards the minimax point 1.5 as q grows; the worst client's loss (3 − w*)² falls with q."""
    worst = []
    for q in (0, 1, 2, 5):
        alg = QFFL(q=q, eps=0.0, local=LocalTraining(lr=0.1, batch_size=1))
        state = alg.init(_setup({"1.weight": torch.tensor([[2.0]])}, ["1.weight"]))
        for rnd in range(1, 101):
            acc = alg.accumulator(state, rnd)
            for cid, target in enumerate((0.0, 0.0, 3.0)):
                task = ClientTask(rnd, state.params)
                res = alg.local_update(task, _ctx(_line(0.0), target, cid))
                alg.validate_result(task, res)
                acc.add(cid, task, res)
            state, _ = alg.aggregate(state, rnd, acc)
        w = state.params["1.weight"].item()
        assert w == pytest.approx(3 / (1 + 2 ** (1 / (2 * q + 1))), abs=1e-5)
        worst.append((3 - w) ** 2)
    # q = 0, 1, 2, 5: worst loss 4, 2.80, 2.57, 2.39
    assert worst == sorted(worst, reverse=True) and worst[0] - worst[-1] > 1.5


def test_loss_is_taken_in_eval_mode_and_lr_follows_the_round():
    # Dropout(0.9) would zero the input (and give loss 1) most of the time in train mode
    alg = QFFL(q=1, eps=0.0, local=LocalTraining(lr=0.5, lr_decay=0.5, batch_size=1))
    model = _line(3.0, dropout=0.9)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    res = alg.local_update(ClientTask(2, params), _ctx(model, 1.0))
    assert float(res.extras["loss"]) == 4.0
    # round 2: lr 0.25, L = 4, Δw = 4·(3 − w̄) and h = ‖Δw‖² + 4·F
    dw = 4.0 * (3.0 - model[1].weight.item())
    assert res.params["1.weight"].item() == pytest.approx(4.0 * dw, rel=1e-6)
    assert float(res.extras["h"]) == pytest.approx(dw**2 + 16.0, rel=1e-6)


def test_terms_with_the_authors_eps_stay_finite_at_zero_loss():
    zero = {"w": torch.zeros(2, dtype=torch.float64)}
    scale, h = qffl_terms(0.0, zero, q=0.5, lipschitz=10.0, eps=1e-10)
    assert scale == pytest.approx(1e-5) and h == pytest.approx(1e-4) and h > 0
    assert qffl_terms(0.0, zero, q=0.0, lipschitz=10.0) == (1.0, 10.0)
    assert qffl_terms(3.0, {"w": torch.tensor([1.0, 2.0])}, q=2.0, lipschitz=0.5) == (9.0, 2 * 3 * 5 + 0.5 * 9)


def test_validate_result_refuses_bad_h_and_loss():
    alg = QFFL()
    task = ClientTask(1, {"w": torch.zeros(2)})

    def res(h, loss=1.0, w=(0.0, 0.0)):
        extras = {} if h is None else {"h": torch.tensor(h, dtype=torch.float64), "loss": torch.tensor(loss, dtype=torch.float64)}
        return ClientResult({"w": torch.tensor(w)}, 1, extras=extras)

    alg.validate_result(task, res(1.0))
    for bad, match in [
        (res(0.0), "h is 0.0"),
        (res(-1.0), "h is -1.0"),
        (res(math.nan), "h is nan"),
        (res(math.inf), "h is inf"),
        (res(1.0, loss=-0.5), "loss is -0.5"),
        (res(None), "missing"),
        (res(1.0, w=(0.0, math.nan)), "NaN"),
    ]:
        with pytest.raises(ClientError, match=match):
            alg.validate_result(task, bad)


@pytest.mark.parametrize("bad", [-0.5, math.nan, math.inf, True, "1"])
def test_bad_q_is_rejected(bad):
    with pytest.raises(ValueError, match=r"algorithm\.q: got .*, allowed: a finite number, q >= 0"):
        QFFL(q=bad)
    with pytest.raises(ValueError, match=r"algorithm\.eps: got -1"):
        QFFL(eps=-1)


# -- end to end -----------------------------------------------------------------------------------
def _overrides(*extra):
    return [
        "seed=0",
        "rounds=8",
        "algorithm.name=qffl",
        "data.dataset=synthetic",
        "data.num_clients=4",
        "model.name=mlp",
        "model.options={hidden: [8]}",
        "local.batch_size=32",
        "local.lr=0.1",
        "logging.progress=off",
        *extra,
    ]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"algorithm\.q: got -1"):
        build_run(load_config(None, _overrides("algorithm.q=-1")), tmp_path / "a")
    with pytest.raises(ConfigError, match="has no server optimizer"):
        build_run(load_config(None, _overrides("server.name=fedadam")), tmp_path / "b")


def test_end_to_end_learns_and_logs_the_client_losses(tmp_path):
    run = build_run(load_config(None, _overrides("rounds=15", "algorithm.q=1")), tmp_path)
    result = run_rounds(run)
    first, last = result.history[0], result.history[-1]
    assert all(r["trained"] == 4 and r["failures"] == 0 for r in result.history)
    # 4 balanced classes: chance is 0.25
    assert first["eval/global/accuracy"] < 0.7 and last["eval/global/accuracy"] > 0.9
    assert last["qffl_loss_mean"] < first["qffl_loss_mean"]
    rows = [json.loads(line) for line in (tmp_path / "clients.jsonl").read_text().splitlines()]
    assert all(r["qffl_loss"] > 0 and r["qffl_h"] > 0 for r in rows if "error" not in r and "qffl_loss" in r)


def test_q_zero_end_to_end_matches_uniform_fedavg(tmp_path):
    q0 = run_rounds(build_run(load_config(None, _overrides("rounds=2", "algorithm.q=0")), tmp_path / "q"))
    avg = run_rounds(
        build_run(
            load_config(None, _overrides("rounds=2", "algorithm.name=fedavg", "algorithm.weighting=uniform")),
            tmp_path / "f",
        )
    )
    assert isinstance(QFFL(), QFFL) and not issubclass(QFFL, FedAvg)
    assert set(q0.params) == set(avg.params)
    for n in q0.params:
        torch.testing.assert_close(q0.params[n], avg.params[n], rtol=0, atol=1e-5)
