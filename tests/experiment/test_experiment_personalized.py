"""Personalized results: per-client evaluation rows, their distribution in the report, the mask
analysis (Hamming distances beside label cosines), and resuming a decentralized run."""

import json

import numpy as np
import pytest
import torch
from conftest import run_interrupted

from fedhet.cli.main import main
from fedhet.experiment.build import build_run
from fedhet.experiment.config import dump_config, load_config
from fedhet.experiment.logging import CLIENTS, METRICS
from fedhet.experiment.masks import cosine_matrix, hamming_matrix, mask_analysis
from fedhet.experiment.report import client_values, markdown_client_table, report_from_dirs
from fedhet.simulation.loop import run_rounds

pytestmark = pytest.mark.usefixtures("one_thread")


def _dispfl(*extra, rounds=3):
    return [
        f"rounds={rounds}",
        "algorithm.name=dispfl",
        "algorithm.neighbours=2",
        "data.dataset=synthetic",
        "data.num_clients=6",
        "data.partitioner=dirichlet",
        "data.alpha=0.3",
        "model.options={hidden: [16]}",
        "devices.tiers=[{name: a, density: 0.5}]",
        "local.batch_size=16",
        "local.max_steps=3",
        "logging.progress=off",
        *extra,
    ]


def test_hamming_and_cosine_matrices_by_hand():
    masks = [
        {"a": torch.tensor([True, True, False, False])},
        {"a": torch.tensor([True, False, True, False])},
        {"a": torch.tensor([True, True, False, False])},
    ]
    ham = hamming_matrix(masks)
    assert ham.tolist() == [[0.0, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.0]]
    cos = cosine_matrix(np.array([[3.0, 4.0], [4.0, 3.0], [0.0, 0.0]]))
    assert cos[0, 1] == pytest.approx(24 / 25) and cos[0, 0] == pytest.approx(1.0) and cos[2, 2] == 0.0


def test_every_client_is_evaluated_and_logged_with_the_distribution_in_the_report(tmp_path):
    # FedAvg with 2 of 6 clients a round: every client still gets an evaluation row
    cfg = load_config(None, [
        "rounds=2", "data.dataset=synthetic", "data.num_clients=6", "model.options={hidden: [8]}",
        "selection.clients_per_round=2", "logging.progress=off", "algorithm.finetune=1",
    ])
    result = run_rounds(build_run(cfg, tmp_path / "FedAvg+FT"))
    rows = [json.loads(line) for line in (tmp_path / "FedAvg+FT" / CLIENTS).read_text().splitlines()]
    last = [r for r in rows if r["round"] == 2]
    assert sorted(r["client"] for r in last) == list(range(6))
    assert sum("bytes_up" in r for r in last) == 2  # trained clients keep their training fields
    vals = sorted(r["eval_accuracy"] for r in last)
    assert result.history[-1]["clients/accuracy_mean"] == pytest.approx(sum(vals) / 6)
    metric, got = client_values(tmp_path / "FedAvg+FT")
    assert metric == "accuracy" and sorted(got) == vals
    rows_out = report_from_dirs([tmp_path / "FedAvg+FT"], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| FedAvg+FT | 6 |" in text and (tmp_path / "report" / "clients.png").exists()
    assert (tmp_path / "report" / "clients_accuracy.png").exists() and "clients_accuracy.png" in text
    assert rows_out[0]["variant"] == "FedAvg+FT"


def test_client_table_by_hand():
    table = markdown_client_table({"A": ("accuracy", [0.1, 0.5, 0.3, 0.9, 0.7])})
    # mean 0.5, median 0.5, p10 = sorted[int(0.1*4)] = 0.1, min 0.1, max 0.9
    assert table.splitlines()[-1] == "| A | 5 | 50.00 | 50.00 | 10.00 | 10.00 | 90.00 |"


def test_fine_tuning_changes_client_evaluation_but_not_the_global_model(tmp_path):
    base = ["rounds=2", "data.dataset=synthetic", "data.num_clients=4", "model.options={hidden: [8]}", "logging.progress=off"]
    plain = run_rounds(build_run(load_config(None, base), tmp_path / "a"))
    tuned = run_rounds(build_run(load_config(None, [*base, "algorithm.finetune=2"]), tmp_path / "b"))
    assert all(torch.equal(plain.params[k], tuned.params[k]) for k in plain.params)
    assert plain.history[-1]["eval/global/accuracy"] == tuned.history[-1]["eval/global/accuracy"]
    assert plain.history[-1]["clients/accuracy_mean"] != tuned.history[-1]["clients/accuracy_mean"]
    with pytest.raises(Exception, match="algorithm.finetune: got -1"):
        build_run(load_config(None, [*base, "algorithm.finetune=-1"]), tmp_path / "c")


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_mask_analysis_of_a_finished_dispfl_run(tmp_path, store, capsys):
    cfg = load_config(None, _dispfl(f"runtime.store={store}"))
    run_rounds(build_run(cfg, tmp_path / "run"))
    (tmp_path / "run" / "config.yaml").write_text(dump_config(cfg))  # as `fedhet run` and `compare` save it
    summary = mask_analysis(tmp_path / "run", tmp_path / "out")
    assert sorted(summary["clients"]) == list(range(6))
    ham = np.array(summary["hamming"])
    assert ham.shape == (6, 6) and np.all(np.diag(ham) == 0) and np.allclose(ham, ham.T)
    assert 0 < summary["mean_hamming"] < 1 and -1 <= summary["pearson"] <= 1
    assert (tmp_path / "out" / "masks.png").exists() and json.loads((tmp_path / "out" / "masks.json").read_text())["clients"]
    assert main(["masks", str(tmp_path / "run"), "--out", str(tmp_path / "cli")]) == 0
    assert "Pearson" in capsys.readouterr().out


def test_mask_analysis_of_a_run_without_masks_is_refused(tmp_path, capsys):
    cfg = load_config(None, ["rounds=1", "data.dataset=synthetic", "data.num_clients=3", "model.options={hidden: [4]}", "logging.progress=off", "algorithm.name=local"])
    run_rounds(build_run(cfg, tmp_path / "run"))
    (tmp_path / "run" / "config.yaml").write_text(dump_config(cfg))
    assert main(["masks", str(tmp_path / "run")]) == 2
    assert "no client holds a mask" in capsys.readouterr().err


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_resumed_dispfl_run_equals_a_straight_one(tmp_path, store):
    # interrupted after round 2 of 4 (the drop schedule depends on the planned rounds, so the run is
    # stopped part-way rather than extended)
    extra = (f"runtime.store={store}",)
    first = build_run(load_config(None, _dispfl(*extra, rounds=4)), tmp_path / "stopped")

    run_interrupted(first, at=2)
    again = build_run(load_config(None, _dispfl(*extra, rounds=4)), tmp_path / "stopped")
    resumed = run_rounds(again, resume=True)
    straight_run = build_run(load_config(None, _dispfl(*extra, rounds=4)), tmp_path / "straight")
    straight = run_rounds(straight_run)
    assert _same(resumed.state, straight.state)
    snap = {c: again.executor.store.get(c) for c in again.executor.store.clients()}
    ref = {c: straight_run.executor.store.get(c) for c in straight_run.executor.store.clients()}
    assert sorted(snap) == list(range(6))
    assert _same(snap, ref)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in straight.history]
    assert len((tmp_path / "stopped" / METRICS).read_text().splitlines()) == 4


def _same(a, b):
    """Equal structure and equal bits (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b
