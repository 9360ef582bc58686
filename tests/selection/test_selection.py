"""fedhet.selection: Power-of-Choice (pow-d, cpow-d, rpow-d), DivFL's facility location, probes
through the loop and executors, availability, and the fairness summaries."""

import json
import math

import pytest
import torch
from conftest import run_interrupted

from fedhet.core.messages import ClientInfo, ModelSize
from fedhet.experiment.build import build_run
from fedhet.experiment.config import ConfigError, load_config
from fedhet.selection import DivFL, PowerOfChoice, Uniform, facility_location
from fedhet.simulation.loop import _summary, run_rounds

pytestmark = pytest.mark.usefixtures("one_thread")


def _infos(n, sizes=None):
    sizes = sizes or [10] * n
    return [ClientInfo(i, sizes[i], 5, "a", ModelSize()) for i in range(n)]


class _Probe:
    """A fake probe: fixed answers, and a record of what was asked."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def __call__(self, cids, what, batch=None):
        self.calls.append((list(cids), what, batch))
        return {c: torch.as_tensor(self.answers[c]) for c in cids if c in self.answers}


def test_facility_location_by_hand():
    # points 0, 1, 10, 11 on a line: the first pick is a medoid (columns 1 and 2 tie at a total
    # distance of 20; the lower index wins), the second the best in the other pair (2 and 3 tie at
    # a gain of 18; 2 wins)
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    assert facility_location(torch.cdist(x, x), 2) == [1, 2]
    assert facility_location(torch.cdist(x, x), 1) == [1]
    assert sorted(facility_location(torch.cdist(x, x), 4)) == [0, 1, 2, 3]


def test_pow_d_keeps_the_highest_loss_candidates():
    sel = PowerOfChoice("pow-d", clients_per_round=2, candidates=4)
    infos = _infos(8)
    cands = sel.candidate_set(3, infos, seed=0)
    assert len(cands) == 4 and cands == sorted(set(cands))
    losses = {c: float(i) for i, c in enumerate(cands)}  # the last two candidates have the highest loss
    probe = _Probe(losses)
    chosen, state = sel.select({}, 3, infos, 0, probe)
    assert chosen == sorted(cands[2:]) and probe.calls == [(cands, "loss", None)]
    # cpow-d asks for the loss on a mini-batch of `batch` examples
    probe = _Probe(losses)
    PowerOfChoice("cpow-d", clients_per_round=2, candidates=4, batch=16).select({}, 3, infos, 0, probe)
    assert probe.calls[0][1:] == ("loss", 16)
    # a candidate that cannot answer is not chosen ahead of those that did
    probe = _Probe({c: 1.0 for c in cands[1:]})
    chosen, _ = sel.select({}, 3, infos, 0, probe)
    assert cands[0] not in chosen


def test_candidates_are_drawn_by_data_size_and_only_from_eligible_clients():
    sel = PowerOfChoice("pow-d", clients_per_round=1, candidates=1)
    infos = _infos(3, sizes=[1, 1, 98])
    picks = [sel.candidate_set(r, infos, seed=0)[0] for r in range(1, 201)]
    assert picks.count(2) > 180  # probability 0.98 each round
    online = [c for c in _infos(6) if c.id % 2 == 0]
    for r in range(1, 30):
        chosen, _ = PowerOfChoice("pow-d", 2, 3).select({}, r, online, 0, _Probe({i: float(i) for i in range(6)}))
        assert set(chosen) <= {0, 2, 4}


def test_rpow_d_uses_the_last_reported_losses_and_tries_unseen_clients_first():
    sel = PowerOfChoice("rpow-d", clients_per_round=2, candidates=4)
    infos = _infos(4)
    state = sel.init(infos)
    chosen, state = sel.select(state, 1, infos, 0)  # no probe needed; every loss is +inf: lower ids
    assert chosen == [0, 1]
    state = sel.update(state, 1, {0: {"train_loss": 0.5}, 1: {"train_loss": 2.0}})
    assert state == {0: 0.5, 1: 2.0}
    chosen, state = sel.select(state, 2, infos, 0)
    assert chosen == [2, 3]  # unseen (+inf) first
    state = sel.update(state, 2, {2: {"train_loss": 1.0}, 3: {"train_loss": 0.1}})
    chosen, _ = sel.select(state, 3, infos, 0)
    assert chosen == [1, 2]  # losses 2.0 and 1.0


def test_divfl_probes_everyone_once_then_refreshes_only_the_selected():
    sel = DivFL(clients_per_round=2)
    infos = _infos(4)
    grads = {0: [0.0, 0.0], 1: [1.0, 0.0], 2: [10.0, 0.0], 3: [11.0, 0.0]}
    probe = _Probe(grads)
    chosen, state = sel.select(sel.init(infos), 1, infos, 0, probe)
    assert chosen == [1, 2] and probe.calls == [([0, 1, 2, 3], "grad", None)]
    probe = _Probe({c: [v[0] + 100, 0.0] for c, v in grads.items()})
    chosen2, state2 = sel.select(state, 2, infos, 0, probe)
    assert probe.calls == [([1, 2], "grad", None)]  # only the selected clients send fresh gradients
    assert state2[0].tolist() == [0.0, 0.0] and state2[1].tolist() == [101.0, 0.0]
    # refresh_every=1 probes every client every round
    probe = _Probe(grads)
    DivFL(clients_per_round=2, refresh_every=1).select(state, 2, infos, 0, probe)
    assert probe.calls == [([0, 1, 2, 3], "grad", None)]
    with pytest.raises(ValueError, match="different lengths"):
        sel.select({0: torch.zeros(2), 1: torch.zeros(3), 2: torch.zeros(2)}, 2, _infos(3), 0, _Probe({}))


def test_fairness_summary_by_hand():
    s = _summary([0.2, 0.4, 0.6, 0.8], "a")
    assert s["a_mean"] == pytest.approx(0.5) and s["a_var"] == pytest.approx(0.05)
    assert s["a_worst10"] == pytest.approx(0.2)  # ceil(0.1 * 4) = 1 client
    assert s["a_jain"] == pytest.approx(2.0**2 / (4 * 1.2))
    assert _summary([0.5, 0.5], "b")["b_jain"] == pytest.approx(1.0)


BASE = [
    "rounds=3",
    "data.dataset=synthetic",
    "data.num_clients=8",
    "data.partitioner=dirichlet",
    "data.alpha=0.3",
    "model.options={hidden: [8]}",
    "local.max_steps=2",
    "logging.progress=off",
]


@pytest.mark.parametrize(
    "extra",
    [
        ["selection.name=pow-d", "selection.clients_per_round=3", "selection.candidates=5"],
        ["selection.name=cpow-d", "selection.clients_per_round=3", "selection.batch=8"],
        ["selection.name=rpow-d", "selection.clients_per_round=3"],
        ["selection.name=divfl", "selection.clients_per_round=3"],
    ],
    ids=["pow-d", "cpow-d", "rpow-d", "divfl"],
)
def test_selectors_run_through_the_loop_count_probe_bytes_and_resume(tmp_path, extra):
    run = build_run(load_config(None, [*BASE, *extra]), tmp_path / "a")
    result = run_rounds(run)
    assert all(r["selected"] == 3 for r in result.history)
    probed = [r.get("probe_bytes_down", 0) for r in result.history]
    assert (sum(probed) > 0) == ("rpow-d" not in extra[0])
    assert all(r["bytes_down"] >= r.get("probe_bytes_down", 0) for r in result.history)
    assert "clients/accuracy_jain" in result.history[-1] and "clients/accuracy_worst10" in result.history[-1]
    # the same seed gives the same selections, also when resumed from round 2 of 3
    again = build_run(load_config(None, [*BASE, *extra]), tmp_path / "b")

    run_interrupted(again, at=2)
    resumed = run_rounds(build_run(load_config(None, [*BASE, *extra]), tmp_path / "b"), resume=True)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in result.history]


def test_offline_clients_are_never_selected(tmp_path):
    run = build_run(load_config(None, [*BASE, "rounds=6", "devices.unavailable=0.5", "selection.name=pow-d", "selection.clients_per_round=2"]), tmp_path)
    result = run_rounds(run)
    rows = [json.loads(line) for line in (tmp_path / "clients.jsonl").read_text().splitlines()]
    for rnd in range(1, 7):
        trained = {r["client"] for r in rows if r["round"] == rnd and "bytes_up" in r}
        assert all(not run.fleet.availability.offline(c, rnd, run.seed) for c in trained)
    assert sum(r["selected"] for r in result.history) > 0


def test_bad_selection_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="selection.candidates: got 2, allowed: >= selection.clients_per_round"):
        build_run(load_config(None, [*BASE, "selection.name=pow-d", "selection.clients_per_round=3", "selection.candidates=2"]), tmp_path)
    with pytest.raises(ConfigError, match="selection.batch: got 8, but selection 'pow-d' does not use it"):
        build_run(load_config(None, [*BASE, "selection.name=pow-d", "selection.clients_per_round=3", "selection.batch=8"]), tmp_path)
    with pytest.raises(ConfigError, match="selection.clients_per_round: missing"):
        build_run(load_config(None, [*BASE, "selection.name=divfl"]), tmp_path)
    with pytest.raises(ConfigError, match="selection.name"):
        load_config(None, ["selection.name=best"])
    assert Uniform(fraction=0.5).count(7) == 4
    assert math.isfinite(PowerOfChoice().batch)
