"""fedhet.algorithms.splitmix: base choice, per-base aggregation, width-r ensembles, the client's
bases and loss, and a short run on digits."""

import json
import math
import pickle
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedhet.algorithms.splitmix import (
    BASES,
    SAMPLER_END,
    EnsembleLoss,
    SplitMix,
    bases_for_width,
    first_picks,
)
from fedhet.core import rng
from fedhet.core.algorithm import ServerSetup, load_params
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ModelSize
from fedhet.data.base import ArrayDataset
from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.models.ensemble import Ensemble
from fedhet.simulation.loop import run_rounds
from fedhet.training.local import LocalTraining

pytestmark = pytest.mark.usefixtures("one_thread")


def _builder(config):
    with rng.seeded(0, "test_splitmix"):
        return Ensemble([nn.Linear(2, 2) for _ in range(config["ensemble"])])


def _setup(seed=0, widths=(1.0, 0.5, 0.25)):
    sizes = tuple(ModelSize(width=w) for w in widths)
    return ServerSetup(
        params={},
        trainable=frozenset(),
        clients=[],
        global_size=sizes[0],
        generator=torch.Generator().manual_seed(seed),
        build_model=_builder,
        sizes=sizes,
    )


def _info(cid, width):
    return ClientInfo(cid, 10, 2, "t", ModelSize(width=width))


def _ids(task):
    return task.extras[BASES].tolist()


def test_atom_and_masked_ce_are_validated():
    with pytest.raises(ValueError, match=r"algorithm\.atom: got 0\.3"):
        SplitMix(atom=0.3)
    with pytest.raises(ValueError, match=r"algorithm\.atom"):
        SplitMix(atom=0.0)
    with pytest.raises(ValueError, match=r"algorithm\.masked_ce: got 'client', allowed: none, batch"):
        SplitMix(masked_ce="client")
    assert SplitMix().k == 8 and SplitMix(atom=0.25).k == 4 and SplitMix(atom=1.0).k == 1


def test_bases_per_width_are_the_floor_of_the_budget():
    # floor(r / atom) with atom 1/8: 1 -> 8, 0.5 -> 4, 0.3 -> 2.4 -> 2, 0.3125 -> 2.5 -> 2, 0.375 -> 3, 0.2499 -> 1.999 -> 1
    got = [bases_for_width(w, 0.125, 8) for w in (1.0, 0.5, 0.3, 0.3125, 0.375, 0.2499)]
    assert got == [8, 4, 2, 2, 3, 1]
    for narrow in (0.0625, 0.01):
        with pytest.raises(ValueError, match=rf"width {narrow:g} is narrower than one base \(algorithm.atom=0.125\)"):
            bases_for_width(narrow, 0.125, 8)


def test_a_tier_narrower_than_the_atom_is_refused_naming_it(tmp_path):
    from fedhet.experiment.build import build_run
    from fedhet.experiment.config import load_config
    from fedhet.simulation.loop import init_state

    cfg = load_config(None, ["algorithm.name=splitmix", "algorithm.atom=0.25", "data.dataset=synthetic", "data.num_clients=6", "model.name=mlp", "devices.tiers=a1-b1-c1-d1"])
    run = build_run(cfg, tmp_path)
    with pytest.raises(ValueError, match=r"algorithm.atom: got 0.25, but tier 'd' has width 0.125, narrower than one base"):
        init_state(run)


def test_init_builds_the_ensemble_and_rejects_depth_tiers():
    alg = SplitMix(atom=0.25)
    state = alg.init(_setup())
    assert state.model_config == {"width": 0.25, "ensemble": 4}
    assert sorted(state.params) == sorted(f"bases.{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert state.trainable == frozenset(state.params)
    assert state.cursor == 0 and state.eval_widths == (0.5, 0.25)
    bad = ServerSetup({}, frozenset(), [], ModelSize(), torch.Generator(), _builder, (ModelSize(width=1.0, depth=1),))
    with pytest.raises(ValueError, match="differ only in width"):
        alg.init(bad)


def test_first_picks_cycle_through_seeded_permutations():
    seed, k = 7, 8
    picks = first_picks(seed, k, 0, 3 * k)
    for e in range(3):
        block = picks[e * k : (e + 1) * k]
        assert sorted(block) == list(range(k))  # K consecutive first picks are all distinct
        assert block == torch.randperm(k, generator=rng.generator(seed, "splitmix_first", e)).tolist()
    assert picks[:k] != picks[k : 2 * k]  # refreshed with a new permutation when exhausted
    assert first_picks(seed, k, 5, 6) == picks[5:11]  # the stream does not depend on where a round starts


def test_configure_chooses_distinct_bases_and_the_cursor_carries_across_rounds():
    alg = SplitMix(atom=0.125)
    state = alg.init(_setup(seed=3, widths=(1.0, 0.5, 0.25, 0.125)))
    seed = state.sampler_seed
    widths = {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0, 4: 0.125, 5: 0.125, 6: 0.125, 7: 0.125}
    firsts = []
    for rnd in (1, 2, 3):
        clients = [_info(c, w) for c, w in reversed(widths.items())]  # order of the list does not matter
        tasks = alg.configure(state, rnd, clients)
        again = alg.configure(state, rnd, list(reversed(clients)))
        assert {c: _ids(t) for c, t in tasks.items()} == {c: _ids(t) for c, t in again.items()}  # deterministic
        for cid, task in tasks.items():
            ids = _ids(task)
            assert len(ids) == round(widths[cid] / 0.125) and len(set(ids)) == len(ids)
            assert task.config == {"width": 0.125, "ensemble": len(ids)}
            assert int(task.extras[SAMPLER_END]) == 8 * rnd
            # the other n-1 come from the (seed, round, client) generator over the remaining ids
            others = [i for i in range(8) if i != ids[0]]
            draw = torch.randperm(7, generator=rng.generator(seed, "splitmix_rest", rnd, cid))[: len(ids) - 1]
            assert ids[1:] == [others[j] for j in draw.tolist()]
        round_firsts = [_ids(tasks[c])[0] for c in sorted(tasks)]
        assert sorted(round_firsts) == list(range(8))  # 8 clients: every base is someone's first pick
        firsts += round_firsts
        acc = alg.accumulator(state, rnd)
        acc.add(0, tasks[0], ClientResult({k: v + 1 for k, v in tasks[0].params.items()}, 1))
        state, _ = alg.aggregate(state, rnd, acc)
        assert state.cursor == 8 * rnd  # every configured client consumed a position
    assert firsts == first_picks(seed, 8, 0, 24)

    same = alg.init(_setup(seed=3))
    other = alg.init(_setup(seed=4))
    assert same.sampler_seed == seed and other.sampler_seed != seed
    assert first_picks(other.sampler_seed, 8, 0, 24) != firsts


def test_the_accumulator_and_its_spec_callable_pickle_for_the_parallel_executor():
    alg = SplitMix(atom=0.25)
    state = alg.init(_setup())
    acc = pickle.loads(pickle.dumps(alg.accumulator(state, 1)))
    task = alg.base_task(state, 1, [3], extras={SAMPLER_END: torch.tensor(1)})
    assert acc.spec_of(task).names == ["bases.3.weight", "bases.3.bias"]
    acc.add(0, task, ClientResult(dict(task.params), 2))
    assert acc.count == 1 and acc.sampler_end == 1 and type(acc.empty()) is type(acc)


def _state_with(alg, values):
    """A state whose base i has weight values[i] (every entry) and bias 0."""
    state = alg.init(_setup())
    params = {}
    for name, t in state.params.items():
        i = int(name.split(".")[1])
        params[name] = torch.full_like(t, float(values[i])) if name.endswith("weight") else torch.zeros_like(t)
    return replace(state, params=params)


def test_aggregation_is_a_per_base_sample_weighted_mean_over_the_clients_that_trained_it():
    alg = SplitMix(atom=0.25)
    state = _state_with(alg, [0.0, 1.0, 2.0, 3.0])
    end = {SAMPLER_END: torch.tensor(2)}
    ta = alg.base_task(state, 5, [0, 1], extras=end)
    tb = alg.base_task(state, 5, [2, 1], extras=end)
    assert sorted(ta.params) == ["bases.0.bias", "bases.0.weight", "bases.1.bias", "bases.1.weight"]

    def result(task, weights, n):
        values = {k: torch.full_like(v, float(weights[int(k.split(".")[1])])) for k, v in task.params.items()}
        return ClientResult(values, n)

    acc = alg.accumulator(state, 5)
    acc.add(0, ta, result(ta, {0: 10.0, 1: 20.0}, 1))
    part = acc.empty()  # as a parallel worker would
    part.add(1, tb, result(tb, {1: 30.0, 2: 40.0}, 3))
    acc.merge(part)
    new, metrics = alg.aggregate(state, 5, acc)
    w = {i: new.params[f"bases.{i}.weight"] for i in range(4)}
    # base 0: only A -> 10; base 1: (1*20 + 3*30)/4 = 27.5; base 2: only B -> 40; base 3: untouched -> 3
    assert torch.all(w[0] == 10.0) and torch.all(w[1] == 27.5) and torch.all(w[2] == 40.0) and torch.all(w[3] == 3.0)
    assert torch.all(new.params["bases.1.bias"] == 27.5) and torch.all(new.params["bases.3.bias"] == 0.0)
    assert metrics == {"aggregated_clients": 2.0, "bases_trained": 3.0}
    assert new.cursor == 2 and state.cursor == 0
    assert torch.all(state.params["bases.0.weight"] == 0.0)  # the old state is not modified


def test_width_r_target_is_the_mean_of_the_first_n_bases_logits():
    alg = SplitMix(atom=0.25, eval_all_widths=True)
    state = alg.init(_setup())
    params = dict(state.params)
    params["bases.0.weight"] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    params["bases.0.bias"] = torch.tensor([0.0, 0.0])
    params["bases.1.weight"] = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    params["bases.1.bias"] = torch.tensor([1.0, 1.0])
    state = replace(state, params=params)
    targets = alg.eval_targets(state)
    assert list(targets) == ["global", "width_0.75", "width_0.5", "width_0.25"]
    p, config = targets["width_0.5"]
    assert config == {"width": 0.25, "ensemble": 2}
    assert sorted(p) == ["bases.0.bias", "bases.0.weight", "bases.1.bias", "bases.1.weight"]
    model = _builder(config)
    load_params(model, p)
    model.eval()
    # x = (1, 2): base 0 gives (1, 2), base 1 gives (2*1 + 1, 0 + 1) = (3, 1); mean (2, 1.5)
    assert model(torch.tensor([[1.0, 2.0]])).tolist() == [[2.0, 1.5]]
    assert targets["global"][1] == {"width": 0.25, "ensemble": 4} and targets["global"][0] is state.params
    assert targets["width_0.25"][1]["ensemble"] == 1
    assert list(alg.eval_targets(SplitMix(atom=0.25).init(_setup()))) == ["global", "width_0.5", "width_0.25"]


def _ctx(x, y, width=0.5):
    data = ArrayDataset(x, y)
    gen = torch.Generator().manual_seed(0)
    return ClientContext(_info(0, width), data, data, _builder, torch.device("cpu"), gen, {})


def test_the_client_receives_and_returns_only_its_bases_each_trained_on_its_own_loss():
    lr = 0.1
    alg = SplitMix(atom=0.25, local=LocalTraining(batch_size=100, lr=lr, max_steps=1))
    state = alg.init(_setup())
    tasks = alg.configure(state, 1, [_info(0, 0.5), _info(1, 1.0)])
    ids = _ids(tasks[0])
    names = sorted(f"bases.{i}.{p}" for i in ids for p in ("weight", "bias"))
    assert sorted(tasks[0].params) == names  # only the 2 chosen bases travel, under their global names
    assert len(tasks[1].params) == 8
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0]])
    y = torch.tensor([0, 1, 1])
    res = alg.local_update(tasks[0], _ctx(x, y))
    assert sorted(res.params) == names and res.num_examples == 3
    assert res.metrics["steps"] == 1.0 and res.metrics["bases"] == 2.0
    losses = []
    for i in ids:
        w = state.params[f"bases.{i}.weight"].clone().requires_grad_(True)
        b = state.params[f"bases.{i}.bias"].clone().requires_grad_(True)
        loss = F.cross_entropy(x @ w.T + b, y)
        gw, gb = torch.autograd.grad(loss, [w, b])
        torch.testing.assert_close(res.params[f"bases.{i}.weight"], w.detach() - lr * gw, rtol=0, atol=1e-7)
        torch.testing.assert_close(res.params[f"bases.{i}.bias"], b.detach() - lr * gb, rtol=0, atol=1e-7)
        losses.append(float(loss.detach()))
    assert res.metrics["train_loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)  # mean CE per base
    alg.validate_result(tasks[0], res)


def test_client_evaluation_uses_the_first_n_bases_of_its_width():
    alg = SplitMix(atom=0.25)
    state = alg.init(_setup())
    tasks = alg.configure_eval(state, 1, [_info(0, 0.5), _info(1, 0.25), _info(2, 1.0)])
    assert [_ids(tasks[c]) for c in (0, 1, 2)] == [[0, 1], [0], [0, 1, 2, 3]]
    assert sorted(tasks[0].params) == ["bases.0.bias", "bases.0.weight", "bases.1.bias", "bases.1.weight"]
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = alg.evaluate_client(tasks[0], _ctx(x, torch.tensor([0, 1])))
    assert m["examples"] == 2.0 and 0.0 <= m["accuracy"] <= 1.0


def test_batch_masked_loss_zeroes_the_logits_of_classes_absent_from_the_batch():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    y = torch.tensor([0, 0])  # only class 0 is in the batch: classes 1 and 2 become logits 0
    loss = EnsembleLoss("batch")
    # per row: CE of (l0, 0, 0) at class 0 = log(e^l0 + 2) - l0
    ce = lambda l0: math.log(math.exp(l0) + 2) - l0  # noqa: E731
    expected = (ce(1.0) + ce(0.5)) / 2 + (ce(0.0) + ce(2.0)) / 2
    assert float(loss([a, b], y)) == pytest.approx(expected, rel=1e-6)
    plain = EnsembleLoss("none")
    assert float(plain([a, b], y)) == pytest.approx(float(F.cross_entropy(a, y) + F.cross_entropy(b, y)), rel=1e-6)
    # the accuracy counter uses the mean of the (masked) logits: row 0 mean (0.5, 0, 0) -> 0, row 1 (1.25, 0, 0) -> 0
    assert (loss.correct, loss.seen) == (2, 2)


def _digits(tmp_path, extra=()):
    overrides = [
        "seed=0",
        "rounds=4",
        "algorithm.name=splitmix",
        "data.dataset=digits",
        "data.num_clients=4",
        "model.name=mlp",
        "model.options={hidden: [64]}",
        "devices.tiers=a1-b1-c1-d1",
        "devices.policy=tiered",
        "devices.assignment=fixed",
        "local.epochs=1",
        "local.batch_size=32",
        "local.lr=0.1",
        "local.momentum=0.9",
        "logging.progress=off",
        *extra,
    ]
    run = build_run(load_config(None, overrides), tmp_path)
    return run, run_rounds(run)


def test_short_run_on_digits_learns_and_small_clients_move_fewer_bytes(tmp_path):
    run, result = _digits(tmp_path, ["algorithm.masked_ce=batch"])
    last = result.history[-1]
    assert all(r["failures"] == 0 and r["trained"] == 4 for r in result.history)
    assert last["eval/global/accuracy"] > 0.5  # chance is 0.1
    assert last["eval/width_0.125/accuracy"] > 0.3
    assert {"eval/width_0.5/accuracy", "eval/width_0.25/accuracy", "clients/accuracy_mean"} <= set(last)
    rows = [json.loads(line) for line in (tmp_path / "clients.jsonl").read_text().splitlines()]
    by_tier = {r["tier"]: r for r in rows if r["round"] == 1}
    one_base = by_tier["d"]["bytes_down"]
    assert by_tier["a"]["bytes_up"] == 8 * by_tier["d"]["bytes_up"]  # 8 bases vs 1, each the same size
    assert by_tier["b"]["bytes_up"] == 4 * by_tier["d"]["bytes_up"]
    assert one_base < by_tier["c"]["bytes_down"] < by_tier["a"]["bytes_down"]
    assert set(result.params) == set(run.algorithm.global_params(result.state))
