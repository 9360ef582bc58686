"""fedhet.algorithms.ifca: the argmin-loss choice, per-cluster averaging, the initialization
re-draw rule, the model draws, evaluation, and recovery of rotated clusters end to end."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedhet.aggregation.mean import GroupedSum
from fedhet.algorithms.fedavg import FedAvg
from fedhet.algorithms.ifca import (
    CLUSTER_KEY,
    IFCA,
    ChosenCluster,
    IFCAState,
    choose_cluster,
    default_threshold,
    draw_models,
    pack_models,
    unpack_models,
)
from fedhet.core.algorithm import ClientError, ServerSetup
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask, ModelSize
from fedhet.data.base import ArrayDataset
from fedhet.experiment.build import build_run
from fedhet.experiment.clusters import adjusted_rand, cluster_purity, groups_as_mapping
from fedhet.experiment.config import ConfigError, load_config
from fedhet.simulation.loop import run_rounds
from fedhet.training.local import LocalTraining

pytestmark = pytest.mark.usefixtures("one_thread")


def test_choose_cluster_is_the_argmin_with_ties_to_the_lowest_index_and_nan_last():
    assert choose_cluster([0.9, 0.2, 0.5]) == 1
    assert choose_cluster([0.3, 0.3, 0.1, 0.1]) == 2  # tie between 2 and 3 -> 2
    assert choose_cluster([0.4, 0.4]) == 0
    assert choose_cluster([math.nan, 0.7]) == 1
    assert choose_cluster([math.nan, math.nan]) == 0


def test_default_threshold_follows_the_code():
    assert default_threshold(2) == 0.35
    assert default_threshold(4) == 0.1 and default_threshold(8) == 0.1
    assert default_threshold(3) == pytest.approx(1 / 6)
    assert default_threshold(1) == 0.5
    assert IFCA(clusters=3).threshold == pytest.approx(1 / 6)
    assert IFCA(clusters=2, init_threshold=0.2).threshold == 0.2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clusters": 0}, r"algorithm.clusters: got 0, allowed: an integer >= 1"),
        ({"clusters": 2, "init_threshold": 0.6}, r"algorithm.init_threshold: got 0.6, allowed: null or 0 <= value <= 1/clusters \(0.5\)"),
        ({"init_tries": -1}, r"algorithm.init_tries: got -1"),
        ({"weighting": "x"}, r"algorithm.weighting: got 'x', allowed: examples, uniform"),
    ],
)
def test_bad_fields_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IFCA(**kwargs)


def test_bad_fields_are_refused_in_a_config():
    with pytest.raises(ConfigError, match="algorithm.clusters"):
        load_config(None, ["algorithm.name=ifca", "algorithm.clusters=0"])


def test_pack_and_unpack_models_round_trip():
    models = [{"w": torch.tensor([1.0]), "b": torch.tensor([2.0])}, {"w": torch.tensor([3.0]), "b": torch.tensor([4.0])}]
    packed = pack_models(models)
    assert list(packed) == ["cluster0/w", "cluster0/b", "cluster1/w", "cluster1/b"]
    back = unpack_models(packed)
    assert [{k: v.item() for k, v in m.items()} for m in back] == [{"w": 1.0, "b": 2.0}, {"w": 3.0, "b": 4.0}]
    with pytest.raises(ValueError, match="cluster<j>/<name>"):
        unpack_models({"w": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="expected 0..1"):
        unpack_models({"cluster0/w": torch.tensor(1.0), "cluster2/w": torch.tensor(1.0)})


# -- draws -------------------------------------------------------------------------------------------


def test_draws_permute_trainable_tensors_and_keep_buffers():
    initial = {
        "w": torch.arange(12.0).reshape(3, 4),
        "b": torch.arange(3.0),
        "bn.running_mean": torch.arange(3.0),
        "bn.num_batches_tracked": torch.tensor(0),
    }
    trainable = frozenset({"w", "b"})
    models = draw_models(initial, trainable, 3, seed=7, draw=0)
    assert all(torch.equal(models[0][n], initial[n]) for n in initial)  # draw 0, model 0: the run's init
    for m in models[1:]:
        for n in ("w", "b"):  # a permutation of the same entries, shape kept
            assert m[n].shape == initial[n].shape
            assert torch.equal(m[n].reshape(-1).sort().values, initial[n].reshape(-1).sort().values)
        assert torch.equal(m["bn.running_mean"], initial["bn.running_mean"])
        assert torch.equal(m["bn.num_batches_tracked"], initial["bn.num_batches_tracked"])
    assert not torch.equal(models[1]["w"], initial["w"]) and not torch.equal(models[1]["w"], models[2]["w"])
    # a re-draw changes every model, model 0 too, and is reproducible
    again = draw_models(initial, trainable, 3, seed=7, draw=1)
    assert all(not torch.equal(again[j]["w"], models[j]["w"]) for j in range(3))
    assert all(torch.equal(a["w"], b["w"]) for a, b in zip(again, draw_models(initial, trainable, 3, seed=7, draw=1), strict=True))
    assert not torch.equal(draw_models(initial, trainable, 3, seed=8, draw=1)[0]["w"], again[0]["w"])
    initial["w"][0, 0] = 99.0
    assert models[0]["w"][0, 0] == 0.0  # copies


def _setup(params, trainable, seed=0):
    return ServerSetup(
        params=params,
        trainable=frozenset(trainable),
        clients=[],
        global_size=ModelSize(),
        generator=torch.Generator().manual_seed(seed),
    )


def test_init_gives_p_distinct_models_and_an_unaccepted_state():
    params = {"w": torch.arange(6.0), "n": torch.tensor(3)}
    state = IFCA(clusters=3).init(_setup(params, ["w", "n"]))
    assert len(state.models) == 3 and state.trainable == frozenset({"w"})
    assert torch.equal(state.models[0]["w"], params["w"])
    assert not torch.equal(state.models[1]["w"], state.models[2]["w"])
    assert state.accepted is False and state.redraws == 0 and state.assignment == {}
    other = IFCA(clusters=3).init(_setup(params, ["w", "n"], seed=1))
    assert not torch.equal(other.models[1]["w"], state.models[1]["w"])


# -- client ------------------------------------------------------------------------------------------


def _ctx(x, y, model, seed=0, test=None):
    data = ArrayDataset(x, y)
    return ClientContext(
        client=ClientInfo(0, len(y), len(y), "a", ModelSize()),
        train=data,
        test=test if test is not None else data,
        build_model=lambda config: model,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(seed),
        store={},
    )


def _data():
    # label = which of the two features is larger
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [3.0, 1.0], [1.0, 3.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 0, 1, 0])
    return x, y


def _cluster_models():
    good = {"weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}  # right on every example
    bad = {"weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}  # wrong on every example
    flat = {"weight": torch.zeros(2, 2)}  # loss log 2
    return [bad, flat, good]


def test_local_update_picks_the_argmin_loss_model_on_the_full_train_split_and_trains_it():
    x, y = _data()
    models = _cluster_models()
    alg = IFCA(clusters=3, local=LocalTraining(batch_size=2, lr=0.1))
    task = ClientTask(round=1, params={}, config={}, extras=pack_models(models))
    res = alg.local_update(task, _ctx(x, y, nn.Linear(2, 2, bias=False), seed=5))

    # the losses each cluster model has on all five examples, by hand
    for j, m in enumerate(models):
        want = float(F.cross_entropy(x @ m["weight"].T, y))
        assert res.metrics[f"cluster_loss_{j}"] == pytest.approx(want, rel=1e-6)
    assert res.metrics["cluster_loss_1"] == pytest.approx(math.log(2))
    assert res.extras[CLUSTER_KEY].item() == 2 and res.extras[CLUSTER_KEY].dtype == torch.int64
    assert res.metrics["cluster"] == 2.0 and res.num_examples == 5

    # ... and what it returns is FedAvg's local training of the chosen model, same generator
    ref = FedAvg(local=alg.local).local_update(ClientTask(1, models[2]), _ctx(x, y, nn.Linear(2, 2, bias=False), seed=5))
    assert torch.equal(res.params["weight"], ref.params["weight"])
    assert not torch.equal(res.params["weight"], models[2]["weight"])
    alg.validate_result(task, res)


def test_local_update_breaks_ties_towards_the_lowest_cluster():
    x, y = _data()
    same = {"weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    task = ClientTask(round=1, params={}, extras=pack_models([{"weight": torch.zeros(2, 2)}, same, same]))
    res = IFCA(clusters=3).local_update(task, _ctx(x, y, nn.Linear(2, 2, bias=False)))
    assert res.extras[CLUSTER_KEY].item() == 1


def test_evaluate_client_uses_the_argmin_model_of_the_train_split_on_the_test_split():
    x, y = _data()
    # the test split has flipped labels: the model chosen on train data is wrong on every test example
    test = ArrayDataset(x, 1 - y)
    task = ClientTask(round=1, params={}, extras=pack_models(_cluster_models()))
    m = IFCA(clusters=3).evaluate_client(task, _ctx(x, y, nn.Linear(2, 2, bias=False), test=test))
    assert m["cluster"] == 2.0
    assert m["accuracy"] == 0.0 and m["examples"] == 5.0


def test_validate_result_checks_the_cluster_and_the_chosen_models_shapes():
    alg = IFCA(clusters=2)
    task = ClientTask(1, {}, extras=pack_models([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}]))
    ok = ClientResult({"w": torch.ones(2)}, 1, extras={CLUSTER_KEY: torch.tensor(1)})
    alg.validate_result(task, ok)
    for bad in (torch.tensor(2), torch.tensor(-1), torch.tensor(0.0), torch.tensor([0])):
        with pytest.raises(ClientError, match="extras\\['cluster'\\]"):
            alg.validate_result(task, ClientResult({"w": torch.ones(2)}, 1, extras={CLUSTER_KEY: bad}))
    with pytest.raises(ClientError, match="extras"):
        alg.validate_result(task, ClientResult({"w": torch.ones(2)}, 1))
    with pytest.raises(ClientError, match="shape"):
        alg.validate_result(task, ClientResult({"w": torch.ones(3)}, 1, extras={CLUSTER_KEY: torch.tensor(0)}))


# -- server ------------------------------------------------------------------------------------------


def _state(models, accepted=True, **kw):
    return IFCAState(models=models, trainable=frozenset({"w"}), model_config={}, accepted=accepted, **kw)


def _result(w, cluster, n=1):
    return ClientResult({"w": torch.tensor(w)}, num_examples=n, extras={CLUSTER_KEY: torch.tensor(cluster)})


def _acc(alg, state, results):
    acc = alg.accumulator(state, 1)
    for cid, res in results.items():
        acc.add(cid, ClientTask(1, {}), res)
    return acc


def test_configure_sends_every_cluster_model_to_every_client():
    models = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}]
    alg = IFCA(clusters=2)
    tasks = alg.configure(_state(models), 3, [ClientInfo(c, 5, 1, "a", ModelSize()) for c in (4, 2)])
    assert sorted(tasks) == [2, 4]
    assert tasks[4].params == {} and tasks[4].round == 3
    assert sorted(tasks[4].extras) == ["cluster0/w", "cluster1/w"]
    assert tasks[4].extras["cluster1/w"].item() == 2.0
    assert alg.configure_eval(_state(models), 3, [ClientInfo(4, 5, 1, "a", ModelSize())])[4].extras.keys() == tasks[4].extras.keys()


def test_aggregate_averages_per_cluster_and_keeps_empty_clusters():
    models = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([5.0, 5.0])}, {"w": torch.tensor([7.0, 7.0])}]
    results = {
        1: _result([1.0, 2.0], 0, n=1),
        2: _result([3.0, 6.0], 0, n=3),
        5: _result([10.0, -10.0], 1, n=2),
    }
    alg = IFCA(clusters=3)
    state = _state(models, assignment={9: 2, 1: 1})
    new, metrics = alg.aggregate(state, 4, _acc(alg, state, results))
    assert new.models[0]["w"].tolist() == [2.0, 4.0]  # plain mean of (1, 2) and (3, 6)
    assert new.models[1]["w"].tolist() == [10.0, -10.0]
    assert new.models[2]["w"].tolist() == [7.0, 7.0]  # no member: kept
    assert new.assignment == {1: 0, 2: 0, 5: 1, 9: 2}  # client 9 did not train: its last choice stays
    assert metrics["aggregated_clients"] == 3.0
    assert [metrics[f"ifca/cluster_{j}_clients"] for j in range(3)] == [2.0, 1.0, 0.0]
    assert metrics["ifca/clusters_used"] == 2.0
    assert state.models[0]["w"].tolist() == [0.0, 0.0]  # the old state is not modified

    by_examples = IFCA(clusters=3, weighting="examples")
    new, _ = by_examples.aggregate(state, 4, _acc(by_examples, state, results))
    assert new.models[0]["w"].tolist() == [2.5, 5.0]  # (1*1 + 3*3)/4, (2*1 + 6*3)/4


def test_cluster_sums_merge_like_one_accumulator():
    results = {1: _result([1.0], 0), 2: _result([3.0], 1), 3: _result([5.0], 0)}
    one = GroupedSum(ChosenCluster(), "uniform")
    for cid, r in results.items():
        one.add(cid, ClientTask(1, {}), r)
    a, b = GroupedSum(ChosenCluster(), "uniform"), GroupedSum(ChosenCluster(), "uniform")
    a.add(1, ClientTask(1, {}), results[1])
    b.add(2, ClientTask(1, {}), results[2])
    b.add(3, ClientTask(1, {}), results[3])
    part = a.empty()
    part.merge(a)
    part.merge(b)
    assert part.members == one.members == {1: 0, 2: 1, 3: 0} and [part.groups[j].count for j in range(2)] == [2, 1]
    ref = {"w": torch.tensor([0.0])}
    assert [part.groups[j].mean(ref)["w"].item() for j in range(2)] == [one.groups[j].mean(ref)["w"].item() for j in range(2)] == [3.0, 3.0]


def test_initialization_check_redraws_until_every_cluster_gets_its_share():
    initial = {"w": torch.arange(8.0)}
    alg = IFCA(clusters=2, init_tries=2)  # threshold 0.35
    state = alg.init(_setup(initial, ["w"]))
    before = [m["w"].clone() for m in state.models]

    # 4 clients, 1 in cluster 1: 1 < 0.35 * 4 = 1.4 -> discard the round, draw again
    unbalanced = {c: _result([100.0] * 8, 0 if c else 1) for c in range(4)}
    s1, m1 = alg.aggregate(state, 1, _acc(alg, state, unbalanced))
    assert s1.redraws == 1 and s1.accepted is False and s1.assignment == {}
    assert m1["ifca/init_redraws"] == 1.0 and m1["ifca/init_accepted"] == 0.0 and m1["aggregated_clients"] == 0.0
    for j in range(2):  # new draws, not the clients' updates
        assert not torch.equal(s1.models[j]["w"], before[j])
        assert torch.equal(s1.models[j]["w"].sort().values, initial["w"])

    # 2 and 2: 2 >= 1.4 -> accepted, and this round's updates are averaged
    balanced = {0: _result([1.0] * 8, 0), 1: _result([3.0] * 8, 0), 2: _result([5.0] * 8, 1), 3: _result([7.0] * 8, 1)}
    s2, m2 = alg.aggregate(s1, 2, _acc(alg, s1, balanced))
    assert s2.accepted is True and s2.redraws == 1
    assert m2["ifca/init_accepted"] == 1.0 and m2["ifca/init_forced"] == 0.0 and m2["ifca/init_redraws"] == 1.0
    assert s2.models[0]["w"].tolist() == [2.0] * 8 and s2.models[1]["w"].tolist() == [6.0] * 8
    assert s2.assignment == {0: 0, 1: 0, 2: 1, 3: 1}

    # once accepted, an unbalanced round is aggregated as it is
    s3, m3 = alg.aggregate(s2, 3, _acc(alg, s2, unbalanced))
    assert "ifca/init_redraws" not in m3 and s3.models[0]["w"].tolist() == [100.0] * 8


def test_initialization_is_accepted_after_init_tries_redraws():
    alg = IFCA(clusters=2, init_tries=2)
    state = alg.init(_setup({"w": torch.arange(4.0)}, ["w"]))
    all_in_0 = {c: _result([1.0] * 4, 0) for c in range(3)}
    for rnd in (1, 2):
        state, metrics = alg.aggregate(state, rnd, _acc(alg, state, all_in_0))
        assert state.redraws == rnd and not state.accepted
    state, metrics = alg.aggregate(state, 3, _acc(alg, state, all_in_0))
    assert state.accepted and metrics["ifca/init_forced"] == 1.0 and metrics["ifca/init_redraws"] == 2.0
    assert state.models[0]["w"].tolist() == [1.0] * 4


def test_threshold_boundary_is_inclusive():
    alg = IFCA(clusters=2, init_tries=5)
    state = alg.init(_setup({"w": torch.arange(4.0)}, ["w"]))
    # 10 clients: 4 >= 3.5 is enough, 3 is not
    four = {c: _result([1.0] * 4, int(c < 4)) for c in range(10)}
    three = {c: _result([1.0] * 4, int(c < 3)) for c in range(10)}
    assert alg.aggregate(state, 1, _acc(alg, state, four))[0].accepted
    assert not alg.aggregate(state, 1, _acc(alg, state, three))[0].accepted


def test_a_round_with_no_results_changes_nothing():
    alg = IFCA(clusters=2)
    state = alg.init(_setup({"w": torch.arange(4.0)}, ["w"]))
    same, metrics = alg.aggregate(state, 1, alg.accumulator(state, 1))
    assert same is state and metrics["aggregated_clients"] == 0.0


def test_targets_and_global_params_hold_every_cluster_model():
    models = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}]
    alg = IFCA(clusters=2)
    state = _state(models)
    assert sorted(alg.eval_targets(state)) == ["cluster_0", "cluster_1"]
    assert {k: v.item() for k, v in alg.global_params(state).items()} == {"cluster0/w": 1.0, "cluster1/w": 2.0}


# -- end to end --------------------------------------------------------------------------------------


def test_ifca_recovers_rotated_clusters_on_digits(tmp_path):
    overrides = [
        "seed=0",
        "rounds=15",
        "algorithm.name=ifca",
        "data.dataset=digits",
        "data.num_clients=10",
        "data.rotate_fraction=0.5",
        "data.rotate_degrees=180",
        "model.name=mlp",
        "model.options={hidden: [32]}",
        "local.batch_size=32",
        "local.lr=0.1",
        "logging.progress=off",
    ]
    run = build_run(load_config(None, overrides), tmp_path)
    result = run_rounds(run)
    truth = groups_as_mapping(run.world.dataset.client_groups)
    assert sorted(truth.values()) == [0] * 5 + [1] * 5
    assignment = result.state.assignment
    assert sorted(assignment) == list(range(10))
    assert cluster_purity(assignment, truth) == 1.0
    assert adjusted_rand(assignment, truth) == 1.0
    last = result.history[-1]
    assert last["ifca/cluster_0_clients"] == last["ifca/cluster_1_clients"] == 5.0
    assert any(r.get("ifca/init_accepted") == 1.0 for r in result.history)
    assert {"eval/cluster_0/accuracy", "eval/cluster_1/accuracy"} <= set(last)


def test_one_cluster_is_fedavg_with_uniform_weights(tmp_path):
    def overrides(*alg):
        return [
            "rounds=2",
            "data.dataset=synthetic",
            "data.num_clients=4",
            "data.partitioner=dirichlet",
            "data.alpha=0.5",
            "model.name=mlp",
            "model.options={hidden: [8]}",
            "local.max_steps=3",
            "eval.clients=false",
            "logging.progress=off",
            *alg,
        ]

    ifca = run_rounds(build_run(load_config(None, overrides("algorithm.name=ifca", "algorithm.clusters=1")), tmp_path / "i"))
    fedavg = run_rounds(build_run(load_config(None, overrides("algorithm.name=fedavg", "algorithm.weighting=uniform")), tmp_path / "f"))
    assert ifca.params.keys() == {f"cluster0/{k}" for k in fedavg.params}
    for k, v in fedavg.params.items():
        assert torch.equal(ifca.params[f"cluster0/{k}"], v), k
