"""Runs on the simulated clock: stragglers train but are not aggregated, the clock survives a resume
bit for bit, the capacity fit gives each client its size and excludes those that hold none,
over-commitment, online windows, and one-line errors for bad device input before training."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fedhet.core.messages import ModelSize
from fedhet.devices.capacity import size_needs
from fedhet.experiment.build import build_run
from fedhet.experiment.config import ConfigError, load_config
from fedhet.simulation.loop import run_rounds

BASE = [
    "data.dataset=synthetic",
    "data.num_clients=6",
    "model.name=mlp",
    "model.options={hidden: [8]}",
    "local.batch_size=64",
    "local.max_steps=1",
    "logging.progress=off",
    "eval.clients=false",
]
FAST = {"flops": 1e12, "memory": 1e12, "down": 1e6, "up": 1e6}
SLOW = {**FAST, "flops": 1e2}  # a training step takes hours at 100 FLOP/s

pytestmark = pytest.mark.usefixtures("one_thread")


def _profiles(tmp_path, rows, name="profiles.csv"):
    path = tmp_path / name
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["client," + ",".join(keys)] + [
        f"{cid}," + ",".join(str(r.get(k, "")) for k in keys) for cid, r in enumerate(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(tmp_path, name, overrides, rounds=3, resume=False):
    cfg = load_config(None, [*BASE, f"rounds={rounds}", *overrides])
    run = build_run(cfg, tmp_path / name)
    return run, run_rounds(run, resume=resume)


def _rows(run_dir, name):
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stragglers_train_but_are_not_aggregated(tmp_path):
    path = _profiles(tmp_path, [FAST] * 4 + [SLOW] * 2)
    clock = ["devices.profiles={source: file, path: %s}" % path, "devices.deadline=100"]
    _, late = _run(tmp_path, "late", clock)
    for row in late.history:
        assert (row["selected"], row["trained"], row["stragglers"]) == (6, 4, 2)
        assert row["sim_round_s"] == 100.0  # the server waits until the deadline for the two slow ones
    assert [r["sim_time"] for r in late.history] == [100.0, 200.0, 300.0]
    clients = _rows(late.run_dir, "clients.jsonl")
    stragglers = [r for r in clients if r.get("straggler")]
    assert sorted({r["client"] for r in stragglers}) == [4, 5] and len(stragglers) == 6
    assert all("bytes_up" not in r and r["examples_seen"] > 0 and r["sim_seconds"] > 100 for r in stragglers)
    assert all(
        r["sim_seconds"] <= 100 and r["sim_compute_s"] > 0 and r["sim_comm_s"] > 0
        for r in clients
        if not r.get("straggler")
    )
    # the same as a run in which the slow clients cannot hold the model at all (excluded): the
    # stragglers' updates never reach the global model
    tiny = _profiles(tmp_path, [FAST] * 4 + [{**FAST, "memory": 1.0}] * 2, "tiny.csv")
    _, without = _run(tmp_path, "without", ["devices.profiles={source: file, path: %s}" % tiny])
    assert [r["selected"] for r in without.history] == [4, 4, 4]
    assert _same(late.params, without.params)


def test_a_resumed_run_keeps_the_clock_exact(tmp_path):
    path = _profiles(tmp_path, [{**FAST, "down_sigma": 5e5, "up_sigma": 5e5}] * 5 + [SLOW])
    clock = [
        "devices.profiles={source: file, path: %s}" % path,
        "devices.deadline=1.0",
        "selection.clients_per_round=3",
    ]
    _, straight = _run(tmp_path, "straight", clock, rounds=4)
    _run(tmp_path, "cut", clock, rounds=2)
    _, resumed = _run(tmp_path, "cut", clock, rounds=4, resume=True)
    assert _same(straight.params, resumed.params)
    keys = ("sim_time", "sim_round_s", "stragglers", "trained")
    assert [[r[k] for k in keys] for r in straight.history] == [
        [r[k] for k in keys] for r in _rows(resumed.run_dir, "metrics.jsonl")
    ]
    # the spread in bandwidth makes rounds differ
    assert len({r["sim_round_s"] for r in straight.history}) > 1


def test_auto_gives_each_client_the_largest_size_it_holds(tmp_path):
    tiers = "devices.tiers=[{name: a, width: 1.0}, {name: b, width: 0.5}]"
    run = build_run(load_config(None, [*BASE, "algorithm.name=heterofl", tiers]), tmp_path / "probe")
    full, half = size_needs(
        run.world.build_model,
        [ModelSize(1.0), ModelSize(0.5)],
        run.world.dataset.input_shape,
        torch.float32,
        run.algorithm.local,
    )
    between = (full.memory + half.memory) / 2
    memories = [1e12, between, between, 1e12, half.memory / 2, 1e12]  # sizes a, b, b, a, none, a
    path = _profiles(tmp_path, [{**FAST, "memory": m} for m in memories])
    profiles = "devices.profiles={source: file, path: %s}" % path
    run, result = _run(tmp_path, "auto", ["algorithm.name=heterofl", tiers, profiles], rounds=2)
    infos = run.fleet.infos(1)
    assert [c.tier for c in infos if not run.fleet.excluded(c)] == ["a", "b", "b", "a", "a"]
    assert [c.size.width for c in infos if c.id != 4] == [1.0, 0.5, 0.5, 1.0, 1.0]
    assert run.fleet.excluded(infos[4])
    clients = _rows(result.run_dir, "clients.jsonl")
    assert 4 not in {r["client"] for r in clients}
    record = json.loads((result.run_dir / "devices.json").read_text())
    assert [c["capacity"] for c in record["clients"]] == ["a", "b", "b", "a", None, "a"]
    assert record["sizes"][0]["train_memory_bytes"] == full.memory
    # AllLarge: every client the full model; those that cannot hold it are excluded
    run = build_run(load_config(None, [*BASE, "algorithm.name=fedavg", tiers, profiles]), tmp_path / "large")
    assert [c.id for c in run.fleet.eligible(run.fleet.infos(1))] == [0, 3, 5]
    # DropWeak: drawn from the clients auto trains (not 4), the weak ones left out after selection
    run = build_run(
        load_config(None, [*BASE, "algorithm.name=fedavg", tiers, profiles, "devices.policy=drop_weak"]),
        tmp_path / "weak",
    )
    eligible = run.fleet.eligible(run.fleet.infos(1))
    assert [c.id for c in eligible] == [0, 1, 2, 3, 5] and [c.id for c in eligible if run.fleet.weak(c)] == [1, 2]


def test_overcommit_selects_more_and_aggregates_the_first_to_finish(tmp_path):
    rows = [{**FAST, "flops": f} for f in (1e12, 1e9, 1e6, 1e5, 1e4, 1e3)]
    path = _profiles(tmp_path, rows)
    over = [
        "devices.profiles={source: file, path: %s}" % path,
        "selection.clients_per_round=2",
        "selection.overcommit=2",
    ]
    _, result = _run(tmp_path, "over", over, rounds=2)
    clients = _rows(result.run_dir, "clients.jsonl")
    for row in result.history:
        assert (row["selected"], row["trained"], row["stragglers"]) == (4, 2, 2)
        mine = [r for r in clients if r["round"] == row["round"]]
        fastest = sorted(mine, key=lambda r: r["sim_seconds"])[:2]
        assert {r["client"] for r in fastest} == {r["client"] for r in mine if not r.get("straggler")}
        assert row["sim_round_s"] == max(r["sim_seconds"] for r in fastest)


def test_only_online_clients_take_part_and_the_clock_waits_for_them(tmp_path):
    trace = tmp_path / "trace.csv"
    # clients 0-2 online for the first 10 s only (and a round costs them 20 s); 3-5 from 1000 s on
    trace.write_text(
        "client,start,end\n"
        + "".join(f"{c},0,10\n" for c in range(3))
        + "".join(f"{c},1000,100000\n" for c in range(3, 6))
    )
    path = _profiles(tmp_path, [{**FAST, "latency": 20}] * 3 + [FAST] * 3)
    cfg = ["devices.profiles={source: file, path: %s}" % path, "devices.availability={trace: %s}" % trace]
    _, result = _run(tmp_path, "online", cfg, rounds=3)
    clients = _rows(result.run_dir, "clients.jsonl")
    first = [r for r in clients if r["round"] == 1]
    assert [r["client"] for r in first] == [0, 1, 2]
    assert all(r["error"] == "went offline before finishing (devices.availability)" for r in first)
    one, two, three = result.history
    assert (one["went_offline"], one["trained"], one["dropped"], one["sim_round_s"], one["sim_time"]) == (
        3,
        0,
        3,
        10.0,
        10.0,
    )
    # nobody is online at 10 s: the clock moves on to 1000 s, when clients 3-5 come online
    assert two["sim_wait_s"] == 990.0 and two["trained"] == 3 and "sim_wait_s" not in three
    assert all({r["client"] for r in clients if r["round"] == k} == {3, 4, 5} for k in (2, 3))
    assert three["sim_time"] == 1000.0 + two["sim_round_s"] + three["sim_round_s"]


def _error(tmp_path, overrides):
    with pytest.raises(ConfigError) as err:
        build_run(load_config(None, [*BASE, *overrides]), tmp_path / "bad")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_bad_device_input_is_refused_in_one_line(tmp_path):
    good = _profiles(tmp_path, [FAST] * 6)
    neg = _profiles(tmp_path, [FAST] * 5 + [{**FAST, "up": -3}], "neg.csv")
    cases = [
        (
            ["devices.tiers=[{name: a, device: phone-ultra}]", "devices.profiles={source: tiers}"],
            "devices.tiers[0].device: unknown device 'phone-ultra'; allowed: phone-low",
        ),
        (
            ["devices.tiers=[{name: a}]", "devices.profiles={source: tiers}"],
            "devices.tiers[0].device: missing (tier 'a')",
        ),
        (
            [
                "devices.tiers=[{name: a, device: {flops: 1.0e9, memory: 1.0e9, down: 1}}]",
                "devices.profiles={source: tiers}",
            ],
            "devices.tiers[0].device: missing up",
        ),
        (
            [
                "devices.tiers=[{name: a, device: {flops: -1, memory: 1.0e9, down: 1, up: 1}}]",
                "devices.profiles={source: tiers}",
            ],
            "devices.tiers[0].device: flops got -1, allowed: a number > 0",
        ),
        ([f"devices.profiles={{source: file, path: {neg}}}"], "neg.csv row 6: up got -3.0, allowed: a number > 0"),
        ([f"devices.profiles={{source: file, path: {tmp_path / 'none.csv'}}}"], "none.csv not found"),
        (["devices.profiles={source: file}"], "devices.profiles.path: missing"),
        (
            [f"devices.profiles={{source: file, path: {good}}}", "devices.deadline=1e-9"],
            "devices.deadline: got 1e-09 s, but no client can finish a round in time",
        ),
        (["devices.deadline=10"], "devices.deadline: given, but there is no simulated clock without device profiles"),
        (
            ["selection.overcommit=1.3", "selection.clients_per_round=2"],
            "selection.overcommit: got 1.3, but without devices.profiles",
        ),
        (
            [f"devices.profiles={{source: file, path: {good}}}", "selection.overcommit=1.3"],
            "selection.overcommit: got 1.3, but every client is selected already",
        ),
        (
            [f"devices.profiles={{source: file, path: {good}}}", "devices.availability={trace: %s}" % good],
            "has columns client, flops, memory, down, up; allowed: exactly client, start, end",
        ),
        (
            [f"devices.profiles={{source: file, path: {good}}}", "devices.availability={daily_hours: 30}"],
            "devices.availability.daily_hours",
        ),
        (
            [f"devices.profiles={{source: file, path: {good}}}", "devices.assignment=dynamic"],
            "devices.assignment: got 'dynamic'",
        ),
    ]
    for overrides, needle in cases:
        message = _error(tmp_path, overrides)
        assert needle in message, (overrides, message)


@pytest.mark.skipif(os.name != "posix", reason="fork-started workers")
def test_the_clock_gives_the_same_bits_with_parallel_workers(tmp_path):
    # FedDyn keeps per-client state, which stragglers update though their updates are not aggregated
    path = _profiles(tmp_path, [{**FAST, "down_sigma": 5e5, "up_sigma": 5e5}] * 4 + [SLOW] * 2)
    clock = ["algorithm.name=feddyn", "devices.profiles={source: file, path: %s}" % path, "devices.deadline=1.0"]
    _, seq = _run(tmp_path, "seq", clock)
    _, par = _run(tmp_path, "par", [*clock, "runtime.workers=2"])
    assert _same(seq.params, par.params)
    assert [r["sim_time"] for r in seq.history] == [r["sim_time"] for r in par.history]
    assert sum(r["stragglers"] for r in seq.history) > 0
