"""fedhet.algorithms.dispfl: mask-count aggregation over neighbours, masked training, prune and
regrow (random, gradient, aggregate = My-1; at aggregation = My-2), routing and per-link bytes."""

import json
import math

import pytest
import torch

from fedhet.aggregation.base import Collect
from fedhet.algorithms.dispfl import DROP, MASK, PARAMS, SHARED, DisPFL, hamming, mask_count_mean
from fedhet.core.algorithm import ClientError, ServerSetup
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask, ModelSize
from fedhet.core.types import params_nbytes, sparse_nbytes
from fedhet.data.base import ArrayDataset
from fedhet.experiment.build import build_run
from fedhet.experiment.config import ConfigError, load_config
from fedhet.simulation.loop import run_rounds
from fedhet.submodel.sparsity import pack_sparse, unpack_sparse
from fedhet.training.local import LocalTraining

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mask_count_mean_by_hand():
    w1, m1 = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([True, True, False, False])
    w2, m2 = torch.tensor([5.0, 6.0, 7.0, 8.0]), torch.tensor([False, True, True, False])
    out = mask_count_mean([({"w": w1 * m1, "b": torch.tensor([1.0])}, {"w": m1}), ({"w": w2 * m2, "b": torch.tensor([3.0])}, {"w": m2})])
    # position 0: only model 1 (1); 1: both ((2+6)/2); 2: only model 2 (7); 3: nobody (0); b: plain mean
    assert out["w"].tolist() == [1.0, 4.0, 7.0, 0.0]
    assert out["b"].tolist() == [2.0]


def test_hamming_is_the_share_of_differing_positions():
    a = {"x": torch.tensor([True, False, True, True]), "y": torch.tensor([[True, False]])}
    b = {"x": torch.tensor([True, True, True, False]), "y": torch.tensor([[False, False]])}
    assert hamming(a, b) == pytest.approx(3 / 6)


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.fc(x)


def _ctx(store, cid=0, lr=0.1, seed=0):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 4, generator=g)
    data = ArrayDataset(x, (x[:, 0] > 0).long())
    model = _Lin()
    init = {"fc.weight": torch.arange(1.0, 9.0).reshape(2, 4)}
    return ClientContext(
        client=ClientInfo(cid, 16, 16, "a", ModelSize(density=0.5)),
        train=data,
        test=data,
        build_model=lambda config: model,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(7),
        store=store,
        initial_params=lambda config: init,
        seed=seed,
        round=1,
    ), model


def _task(rnd, extras=None, drop=0.5):
    return ClientTask(round=rnd, params={}, config={"width": 1.0, "depth": None, "density": 0.5},
                      extras={DROP: torch.tensor(drop, dtype=torch.float64), **(extras or {})})


def test_first_round_starts_from_the_initial_model_on_the_clients_own_mask_and_keeps_it_sparse():
    alg = DisPFL(local=LocalTraining(epochs=2, batch_size=4, lr=0.1))
    store = {}
    ctx, model = _ctx(store)
    result = alg.local_update(_task(1), ctx)
    mask = store[SHARED]["fc.weight"]
    assert int(mask.sum()) == 4  # one tensor (sum 6 / prod 8 -> raw 0.75, dense total 0.5): exactly half
    trained = store[PARAMS]["fc.weight"]
    assert torch.all(trained[~mask] == 0)  # masked training never touches inactive weights
    assert not torch.equal(trained[mask], torch.arange(1.0, 9.0).reshape(2, 4)[mask])  # it did train
    # the published message is the trained model on the mask it trained with, values + bitmap
    dense, masks = unpack_sparse(result.params, {"fc.weight": (2, 4)})
    assert torch.equal(masks["fc.weight"], mask) and torch.equal(dense["fc.weight"], trained)
    assert params_nbytes(result.params) == 4 * 4 + 1 == sparse_nbytes({"fc.weight": trained}, {"fc.weight": mask})
    # prune and regrow at d = 0.5: ceil(0.5 * 4) = 2 dropped, 2 regrown, the count unchanged
    new = store[MASK]["fc.weight"]
    assert int(new.sum()) == 4 and int((new & ~mask).sum()) == 2
    assert result.metrics["mask_changed"] == 4.0


def test_aggregation_is_by_mask_counts_over_own_and_neighbours_then_the_own_mask():
    # lr ~ 0 so the trained model is the aggregated start: m_i ⊙ Σ m_j w_j / Σ m_j
    alg = DisPFL(local=LocalTraining(epochs=1, batch_size=16, lr=1e-30), static=True)
    own_mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    store = {
        PARAMS: {"fc.weight": torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 0.0, 4.0, 0.0]])},
        SHARED: {"fc.weight": own_mask},
        MASK: {"fc.weight": torch.tensor([[True, True, True, False], [False, False, True, True]])},
    }
    peer_mask = torch.tensor([[False, True, True, False], [True, True, False, False]])
    peer = pack_sparse({"fc.weight": torch.tensor([[9.0, 10.0, 11.0, 9.0], [13.0, 14.0, 9.0, 9.0]])}, {"fc.weight": peer_mask})
    ctx, _ = _ctx(store)
    alg.local_update(_task(2, {f"peer/5/{k}": v for k, v in peer.items()}), ctx)
    # mean by counts: [[1, 6, 11, 0], [8, 14, 4, 0]]; times the current mask (not the shared one):
    # position (1,3) is held by no one and starts at 0
    expected = torch.tensor([[1.0, 6.0, 11.0, 0.0], [0.0, 0.0, 4.0, 0.0]])
    assert torch.allclose(store[PARAMS]["fc.weight"], expected)
    assert torch.equal(store[SHARED]["fc.weight"], store[MASK]["fc.weight"])  # static: no mask change


def test_my1_regrows_where_the_aggregate_is_largest():
    alg = DisPFL(local=LocalTraining(epochs=1, batch_size=16, lr=1e-30), regrow="aggregate")
    mask = torch.tensor([[True, True, False, False], [True, True, False, False]])
    store = {PARAMS: {"fc.weight": torch.tensor([[1.0, 5.0, 0.0, 0.0], [6.0, 2.0, 0.0, 0.0]])}, SHARED: {"fc.weight": mask}, MASK: {"fc.weight": mask}}
    peer_mask = ~mask
    peer = pack_sparse({"fc.weight": torch.tensor([[0.0, 0.0, 0.5, -9.0], [0.0, 0.0, 3.0, 0.1]])}, {"fc.weight": peer_mask})
    ctx, _ = _ctx(store)
    alg.local_update(_task(2, {f"peer/1/{k}": v for k, v in peer.items()}, drop=0.5), ctx)
    # drop ceil(0.5*4)=2 smallest |w| (1 and 2 at (0,0), (1,1)); regrow the 2 largest |aggregate|
    # among inactive positions: -9 at (0,3) and 3 at (1,2)
    assert store[MASK]["fc.weight"].tolist() == [[False, True, False, True], [True, False, True, False]]


def test_my2_updates_the_mask_at_aggregation_before_training():
    alg = DisPFL(local=LocalTraining(epochs=1, batch_size=16, lr=1e-30), regrow="aggregate", mask_update="aggregation")
    mask = torch.tensor([[True, True, False, False], [True, True, False, False]])
    store = {PARAMS: {"fc.weight": torch.tensor([[1.0, 5.0, 0.0, 0.0], [6.0, 2.0, 0.0, 0.0]])}, SHARED: {"fc.weight": mask}, MASK: {"fc.weight": mask}}
    peer = pack_sparse({"fc.weight": torch.tensor([[0.0, 0.0, 0.5, -9.0], [0.0, 0.0, 3.0, 0.1]])}, {"fc.weight": ~mask})
    ctx, _ = _ctx(store)
    alg.local_update(_task(2, {f"peer/1/{k}": v for k, v in peer.items()}, drop=0.5), ctx)
    new = [[False, True, False, True], [True, False, True, False]]
    # the client trained on the new mask, starting from the aggregate there (regrown weights included)
    assert store[SHARED]["fc.weight"].tolist() == new and store[MASK]["fc.weight"].tolist() == new
    assert torch.allclose(store[PARAMS]["fc.weight"], torch.tensor([[0.0, 5.0, 0.0, -9.0], [6.0, 0.0, 3.0, 0.0]]))


def test_gradient_regrowth_uses_the_dense_gradient():
    alg = DisPFL(local=LocalTraining(epochs=1, batch_size=16, lr=0.05), regrow="gradient")
    ctx, _ = _ctx({})
    alg.local_update(_task(1), ctx)
    shared, new = ctx.store[SHARED]["fc.weight"], ctx.store[MASK]["fc.weight"]
    assert int(new.sum()) == int(shared.sum()) == 4 and not torch.equal(new, shared)


def _setup(n=4, density=1.0, width=1.0):
    params = {"fc.weight": torch.zeros(2, 4)}
    clients = [ClientInfo(i, 10, 5, "a", ModelSize(width=width, density=density)) for i in range(n)]
    return ServerSetup(params, frozenset(params), clients, ModelSize(), torch.Generator().manual_seed(0), rounds=10)


def test_router_delivers_neighbours_last_messages_and_keeps_a_failed_senders_old_one():
    alg = DisPFL(neighbours=2)
    state = alg.init(_setup())
    msgs = {}
    acc = Collect()
    for cid in range(4):
        w = torch.full((2, 4), float(cid + 1))
        m = torch.zeros(2, 4, dtype=torch.bool)
        m[0, cid] = True
        msgs[cid] = pack_sparse({"fc.weight": w}, {"fc.weight": m})
        acc.add(cid, ClientTask(1, {}), ClientResult(msgs[cid], 10))
    state, metrics = alg.aggregate(state, 1, acc)
    assert metrics["published"] == 4.0 and metrics["rejected_messages"] == 0.0
    infos = [ClientInfo(i, 10, 5, "a", ModelSize()) for i in range(4)]
    tasks = alg.configure(state, 2, infos)
    graph = alg.peers(state, 2)
    for cid, task in tasks.items():
        assert len(graph[cid]) == 2 and cid not in graph[cid]
        got = {int(k.split("/")[1]) for k in task.extras if k.startswith("peer/")}
        assert got == set(graph[cid])
        for j in graph[cid]:
            assert task.extras[f"peer/{j}/fc.weight"] is msgs[j]["fc.weight"]  # routed, not copied
        # a link costs the sparse message: 1 value + a 1-byte bitmap per neighbour (+ the drop scalar)
        assert params_nbytes(task.extras) == 2 * (4 + 1) + 8
    # round 2: client 1 sends a malformed message (3 values for 1 kept position), client 2 nothing
    bad = {"fc.weight": torch.ones(3), "fc.weight#bits": msgs[1]["fc.weight#bits"]}
    acc = Collect()
    acc.add(1, ClientTask(2, {}), ClientResult(bad, 10))
    new_state, metrics = alg.aggregate(state, 2, acc)
    assert metrics["rejected_messages"] == 1.0
    assert new_state.mailbox[1] is msgs[1] and new_state.mailbox[2] is msgs[2]
    with pytest.raises(ClientError, match="3 values for 1 kept"):
        alg.validate_result(tasks[1], ClientResult(bad, 10))
    nan = pack_sparse({"fc.weight": torch.full((2, 4), math.nan)}, {"fc.weight": torch.ones(2, 4, dtype=torch.bool)})
    with pytest.raises(ClientError, match="NaN"):
        alg.validate_result(tasks[1], ClientResult(nan, 10))


def test_topology_and_drop_schedule():
    alg = DisPFL(topology="ring")
    state = alg.init(_setup(5))
    assert alg.peers(state, 3)[0] == [1, 4]
    # d_t = (0.5/2)(1 + cos(pi t / 10)), t = round - 1
    assert alg.drop(state, 1) == pytest.approx(0.5)
    assert alg.drop(state, 6) == pytest.approx(0.25)
    assert alg.drop(state, 11) == pytest.approx(0.0)
    assert DisPFL(static=True).drop(state, 1) == 0.0


def test_bad_settings_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="algorithm.regrow: got 'magic'"):
        DisPFL(regrow="magic")
    with pytest.raises(ValueError, match="algorithm.mask_update"):
        DisPFL(mask_update="never")
    with pytest.raises(ValueError, match="algorithm.topology"):
        DisPFL(topology="star")
    with pytest.raises(ValueError, match="algorithm.neighbours: got 10, allowed: at most 3"):
        DisPFL().init(_setup(4))
    with pytest.raises(ValueError, match="differ only in density"):
        DisPFL(neighbours=2).init(_setup(4, width=0.5))


def _overrides(*extra):
    return [
        "rounds=5",
        "algorithm.name=dispfl",
        "algorithm.neighbours=3",
        "data.dataset=synthetic",
        "data.num_clients=8",
        "data.partitioner=dirichlet",
        "data.alpha=0.3",
        "model.name=mlp",
        "model.options={hidden: [32]}",
        "devices.tiers=[{name: a, density: 0.5}, {name: b, density: 0.25}]",
        "local.batch_size=16",
        "local.epochs=2",
        "logging.progress=off",
        *extra,
    ]


def test_end_to_end_every_client_trains_every_round_and_links_are_counted(tmp_path):
    run = build_run(load_config(None, _overrides()), tmp_path)
    result = run_rounds(run)
    hist = result.history
    assert all(r["trained"] == 8 and r["selected"] == 8 for r in hist)
    assert hist[-1]["clients/accuracy_mean"] > hist[0]["clients/accuracy_mean"]
    assert hist[-1]["clients/accuracy_mean"] > 0.5  # 4 classes
    rows = [json.loads(line) for line in (tmp_path / "clients.jsonl").read_text().splitlines()]
    snap = run.executor.store.snapshot()
    # per-link bytes: a client receives its neighbours' round-4 messages, values + bitmap each; prune
    # and regrow keep the count, so they are as large as the round-5 messages in the mailbox
    state = result.state
    graph = run.algorithm.peers(state, 5)
    dense = params_nbytes(snap[0][PARAMS])
    for r in (r for r in rows if r["round"] == 5):
        sizes = [params_nbytes(state.mailbox[j]) for j in graph[r["client"]]]
        assert r["bytes_down"] == sum(sizes) + 8  # + the drop-fraction scalar
        assert all(s < 0.6 * dense for s in sizes)  # densities 0.5 / 0.25, plus 1 bit a position
        assert r["bytes_up"] == params_nbytes(state.mailbox[r["client"]])
        assert "eval_accuracy" in r
    # the tiers' densities hold: ~0.5 and ~0.25 of the weights (ERK keeps small tensors dense)
    for cid, tier_density in ((0, 0.5), (7, 0.25)):
        masks = snap[cid][MASK]
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        assert kept / total == pytest.approx(tier_density, abs=0.01)
    # personalized masks differ between clients
    assert hamming(snap[0][MASK], snap[1][MASK]) > 0.1


def test_a_decentralized_run_refuses_partial_selection(tmp_path):
    with pytest.raises(ConfigError, match="selection.fraction: got 0.5.*decentralized"):
        build_run(load_config(None, _overrides("selection.fraction=0.5")), tmp_path)


@pytest.mark.parametrize(("mask_gradient", "expected"), [(False, [0.4, 0.0]), (True, [0.0, 0.0])])
def test_gradient_clipping_order_by_hand(mask_gradient: bool, expected: list[float]) -> None:
    """One step of w = [1, 0] with mask [1, 0], gradient [3, 4], clipping at norm 1, lr 1.

    Default (the authors' code): clip the full gradient (norm 5 -> [0.6, 0.8]), step
    (w = [0.4, -0.8]), re-apply the mask -> [0.4, 0]. ``mask_gradient`` (the paper's Algorithm 1):
    mask the gradient first ([3, 0], norm 3 -> [1, 0]), then step -> [0, 0]."""
    from torch import nn

    from fedhet.algorithms.dispfl import mask_hooks
    from fedhet.training.local import train

    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0]]))
    data = ArrayDataset(torch.tensor([[3.0, 4.0]]), torch.tensor([0]))
    after_backward, after_step = mask_hooks({"weight": torch.tensor([[True, False]])}, model, mask_gradient=mask_gradient)
    spec = LocalTraining(epochs=1, batch_size=1, lr=1.0, grad_clip=1.0)
    train(model, data, spec, torch.Generator().manual_seed(0), loss_fn=lambda out, y: out.sum(), after_backward=after_backward, after_step=after_step)
    assert torch.allclose(model.weight.detach(), torch.tensor([expected]), atol=1e-6)
