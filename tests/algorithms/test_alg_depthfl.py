"""DepthFL: the distillation ramp, mutual self-distillation between exits (by hand), the per-element
FedDyn server step over depth sub-models (by hand), per-exit and ensemble evaluation, and a run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedhet.algorithms.depthfl import DepthFL, ExitLoss, ExitMean, multi_exit, mutual_distillation, ramp_weight
from fedhet.core.algorithm import ServerSetup, trainable_names
from fedhet.core.messages import ClientInfo, ClientResult, ModelSize
from fedhet.data.tasks import CLASSIFICATION, IGNORE, Regression, Tagging
from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.models import build_model
from fedhet.simulation.loop import run_rounds

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(config):
    torch.manual_seed(0)
    size = ModelSize(width=config.get("width", 1.0), depth=config.get("depth"))
    return build_model("mlp", input_shape=(2,), num_classes=2, size=size, hidden=(2, 2), exits=config.get("exits", "last"))


def _setup(num_clients=4):
    model = _build({"exits": "all"})
    return ServerSetup(
        params={k: v.detach().clone() for k, v in model.state_dict().items()},
        trainable=trainable_names(model),
        clients=[ClientInfo(i, 10, 2, "a", ModelSize()) for i in range(num_clients)],
        global_size=ModelSize(),
        generator=torch.Generator(),
        build_model=_build,
        sizes=(ModelSize(), ModelSize(depth=1)),
    )


def _kl(q, p):
    """KL(q ‖ p) for probability lists, written out."""
    return sum(qi * (math.log(qi) - math.log(pi)) for qi, pi in zip(q, p))


def test_ramp_weight_follows_the_sigmoid_schedule():
    assert ramp_weight(1, 300) == pytest.approx(math.exp(-5.0))
    assert ramp_weight(151, 300) == pytest.approx(math.exp(-5.0 * 0.25))
    assert ramp_weight(301, 300) == 1.0 and ramp_weight(999, 300) == 1.0
    assert ramp_weight(1, 0) == 1.0


def test_mutual_distillation_by_hand():
    z1 = torch.tensor([[0.0, math.log(3.0)]])  # softmax [1/4, 3/4]
    z2 = torch.tensor([[0.0, 0.0]])  # softmax [1/2, 1/2]
    p1, p2 = [0.25, 0.75], [0.5, 0.5]
    eps = 1e-7
    want = _kl([v + eps for v in p2], p1) + _kl([v + eps for v in p1], p2)
    got = mutual_distillation([z1, z2], torch.tensor([0]), CLASSIFICATION)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # three exits: every ordered pair once, divided by n - 1 = 2
    z3 = torch.tensor([[math.log(3.0), 0.0]])  # [3/4, 1/4]
    p3 = [0.75, 0.25]
    ps = [p1, p2, p3]
    want3 = sum(_kl([v + eps for v in ps[j]], ps[i]) for i in range(3) for j in range(3) if i != j) / 2
    got3 = mutual_distillation([z1, z2, z3], torch.tensor([0]), CLASSIFICATION)
    assert float(got3) == pytest.approx(want3, rel=1e-5)
    assert float(mutual_distillation([z1], torch.tensor([0]), CLASSIFICATION)) == 0.0


def test_mutual_distillation_teachers_are_detached():
    z1 = torch.tensor([[0.0, 1.0]], requires_grad=True)
    z2 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    mutual_distillation([z1, z2], torch.tensor([0]), CLASSIFICATION).backward()
    # d/dz_i of KL(q_j ‖ softmax(z_i)) with q_j fixed is softmax(z_i) − q_j
    q2 = torch.softmax(z2.detach(), -1) + 1e-7
    assert torch.allclose(z1.grad, torch.softmax(z1.detach(), -1) - q2, atol=1e-6)


def test_tagging_distillation_skips_unscored_tokens():
    tags = Tagging(("O", "B-Drug", "I-Drug"))
    a = torch.randn(1, 3, 3)
    b = torch.randn(1, 3, 3)
    target = torch.tensor([[0, IGNORE, 1]])
    keep = torch.tensor([0, 2])
    want = mutual_distillation([a[0, keep], b[0, keep]], torch.tensor([0, 1]), CLASSIFICATION)
    b2 = b.clone()
    b2[0, 1] = 100.0  # an ignored token's scores must not matter
    assert torch.allclose(mutual_distillation([a, b2], target, tags), want)


def test_exit_loss_sums_task_losses_and_adds_weighted_distillation():
    z = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    y = torch.tensor([1])
    ce = F.cross_entropy(z[0], y) + F.cross_entropy(z[1], y)
    assert torch.allclose(ExitLoss(CLASSIFICATION, 0.0)(z, y), ce)
    assert torch.allclose(ExitLoss(CLASSIFICATION, 0.5)(z, y), ce + 0.5 * mutual_distillation(z, y, CLASSIFICATION))
    with pytest.raises(ValueError, match="algorithm.kd"):
        ExitLoss(Regression(), 1.0)
    ExitLoss(Regression(), 0.0)  # plain exit losses are fine for regression


def test_clients_get_multi_exit_models_cut_to_their_depth():
    alg = DepthFL()
    state = alg.init(_setup())
    assert state.model_config["exits"] == "all"
    tasks = alg.configure(state, 1, [ClientInfo(0, 10, 2, "a", ModelSize()), ClientInfo(1, 10, 2, "b", ModelSize(depth=1))])
    assert tasks[1].config == multi_exit({"width": 1.0, "depth": 1, "density": 1.0})
    assert set(tasks[1].params) == {"body.0.weight", "body.0.bias", "exits.0.weight", "exits.0.bias"}
    assert set(tasks[0].params) == set(state.params)


def _result(task, value):
    return ClientResult({k: torch.full_like(v, value) for k, v in task.params.items()}, 10)


@pytest.mark.parametrize("feddyn", [False, True])
def test_aggregation_over_depths_by_hand(feddyn):
    alpha = 0.5
    alg = DepthFL(feddyn=feddyn, alpha=alpha)
    state = alg.init(_setup(num_clients=4))
    state.params = {k: torch.zeros_like(v) for k, v in state.params.items()}
    tasks = alg.configure(state, 1, [ClientInfo(0, 10, 2, "a", ModelSize()), ClientInfo(1, 10, 2, "b", ModelSize(depth=1))])
    acc = alg.accumulator(state, 1)
    acc.add(0, tasks[0], _result(tasks[0], 3.0))
    acc.add(1, tasks[1], _result(tasks[1], 1.0))
    new, _ = alg.aggregate(state, 1, acc)
    shared = float(new.params["body.0.weight"][0, 0])  # both clients: avg 2, m = 2
    deep = float(new.params["body.1.weight"][0, 0])  # only the deep client: avg 3, m = 1
    if not feddyn:
        assert (shared, deep) == (2.0, 3.0)
        return
    # h = −α·(m/N)·(avg − 0);  θ = avg − h/α  with N = 4
    h_shared, h_deep = -alpha * (2 / 4) * 2.0, -alpha * (1 / 4) * 3.0
    assert shared == pytest.approx(2.0 - h_shared / alpha)
    assert deep == pytest.approx(3.0 - h_deep / alpha)
    assert float(new.h["body.0.weight"][0, 0]) == pytest.approx(h_shared)
    # an entry no client held this round keeps its value and its h
    acc2 = alg.accumulator(new, 2)
    t2 = alg.configure(new, 2, [ClientInfo(1, 10, 2, "b", ModelSize(depth=1))])[1]
    acc2.add(1, t2, _result(t2, 0.0))
    newer, _ = alg.aggregate(new, 2, acc2)
    assert torch.equal(newer.params["body.1.weight"], new.params["body.1.weight"])
    assert torch.equal(newer.h["body.1.weight"], new.h["body.1.weight"])


def test_feddyn_needs_uniform_weighting_and_checks_fields():
    with pytest.raises(ValueError, match="algorithm.weighting"):
        DepthFL(weighting="examples")
    DepthFL(weighting="examples", feddyn=False)
    with pytest.raises(ValueError, match="algorithm.kd_ramp"):
        DepthFL(kd_ramp=-1)


def test_eval_targets_are_every_exit_and_the_ensemble():
    alg = DepthFL()
    state = alg.init(_setup())
    targets = alg.eval_targets(state)
    assert list(targets) == ["ensemble", "exit_1", "exit_2"]
    p1, c1 = targets["exit_1"]
    assert c1["depth"] == 1 and "exits" not in c1
    model = _build(c1)
    model.load_state_dict(p1)
    x = torch.randn(5, 2)
    full = _build(state.model_config)
    full.load_state_dict(state.params)
    full.eval()
    outs = full(x)
    assert torch.allclose(model(x), outs[0])
    assert torch.allclose(ExitMean(full)(x), (outs[0] + outs[1]) / 2)


def test_depthfl_run_logs_every_exit_and_keeps_client_state(tmp_path):
    cfg = load_config(
        None,
        [
            "rounds=3",
            "algorithm.name=depthfl",
            "algorithm.kd_ramp=2",
            "data.dataset=synthetic",
            "data.num_clients=4",
            "model.name=mlp",
            "model.options={hidden: [16, 16, 16]}",
            "devices.tiers=[{name: a, depth: 3}, {name: b, depth: 2}, {name: c, depth: 1}]",
            "logging.progress=off",
        ],
    )
    run = build_run(cfg, tmp_path / "run")
    result = run_rounds(run)
    last = result.history[-1]
    assert {"eval/ensemble/accuracy", "eval/exit_1/accuracy", "eval/exit_2/accuracy", "eval/exit_3/accuracy"} <= set(last)
    assert last["eval/ensemble/accuracy"] > 0.5  # the synthetic task is learnable in a few rounds
    stores = run.executor.store.snapshot()
    assert any("feddyn.grad" in s for s in stores.values())
