"""DropWeak like-for-like: the round's clients are drawn from the whole population and the weak ones
are then left out, so strong clients take part exactly as often as under any other policy."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.simulation.loop import run_rounds

BASE = [
    "data.dataset=synthetic",
    "data.num_clients=10",
    "model.name=mlp",
    "rounds=20",
    "devices.tiers=a1-b1",  # clients 0-4 tier a (strong), 5-9 tier b
    "selection.clients_per_round=4",
    "eval.every=100",
    "eval.clients=false",
    "logging.progress=off",
    "local.max_steps=1",
]


def _participation(tmp_path: Path, name: str, *extra: str) -> tuple[list[dict], Counter, list[dict]]:
    result = run_rounds(build_run(load_config(None, [*BASE, *extra]), tmp_path / name))
    rows = [json.loads(line) for line in (result.run_dir / "clients.jsonl").read_text().splitlines()]
    trained = Counter(r["tier"] for r in rows if "train_loss" in r)
    return rows, trained, result.history


def test_drop_weak_samples_from_everyone_then_leaves_the_weak_out(tmp_path: Path) -> None:
    fedavg_rows, fedavg_tiers, _ = _participation(tmp_path, "all_large", "devices.policy=all_large")
    rows, tiers, history = _participation(tmp_path, "drop_weak", "devices.policy=drop_weak")
    selected = lambda rs: [(r["round"], r["client"]) for r in rs]  # noqa: E731
    # the same draw (same seed, same population) as every other policy ...
    assert selected(rows) == selected(fedavg_rows) and len(rows) == 20 * 4
    # ... then the weak are left out: strong clients train exactly as often as under FedAvg
    assert tiers["a"] == fedavg_tiers["a"] and tiers["b"] == 0
    left_out = [r for r in rows if "left_out" in r]
    assert {r["tier"] for r in left_out} == {"b"} and len(left_out) == fedavg_tiers["b"]
    assert all("bytes_down" not in r for r in left_out)  # nothing is sent to them
    assert [h["left_out_weak"] for h in history] == [sum(1 for r in left_out if r["round"] == k) for k in range(1, 21)]
    assert all(h["trained"] + h["left_out_weak"] == 4 and h["dropped"] == 0 for h in history)


def test_drop_weak_before_selection_trains_the_strong_clients_more_often(tmp_path: Path) -> None:
    _, after, _ = _participation(tmp_path, "after", "devices.policy=drop_weak")
    _, before, _ = _participation(tmp_path, "before", "devices.policy=drop_weak", "devices.drop_weak=before_selection")
    # every round draws 4 of the 5 strong clients: 80 strong updates, against about half that like-for-like
    assert before == Counter({"a": 80}) and after["a"] < 60
