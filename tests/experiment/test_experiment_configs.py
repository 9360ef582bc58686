"""Every shipped config validates, and every paper-scale config runs one shrunken round on the real
data (so a GPU run of it does not fail on a typo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from fedhet.experiment.build import build_run
from fedhet.experiment.compare import headline_metric, load_comparison
from fedhet.experiment.config import load_config
from fedhet.simulation.loop import run_rounds

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_validates(path):
    data = yaml.safe_load(path.read_text())
    if "variants" in data:
        assert load_comparison(path).variants
    else:
        load_config(path)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_configs_run_one_shrunken_round(path, tmp_path):
    if not os.environ.get("FEDHET_DATA"):
        pytest.skip("FEDHET_DATA is not set: the paper configs read CIFAR-10 from ../shared/data")
    overrides = [
        "rounds=1",
        "data.train_subset=1000",
        "data.test_subset=50",
        "data.num_clients=10",
        "model.options.hidden=[4, 8, 8, 16]",
        "local.epochs=1",
        "local.max_steps=1",
        "local.batch_size=8",
        "selection.clients_per_round=2",
        "eval.clients=false",
        "logging.progress=off",
    ]
    result = run_rounds(build_run(load_config(path, overrides), tmp_path))
    last = result.history[-1]
    assert last["trained"] == 2 and last["failures"] == 0
    _, headline = headline_metric(last)
    assert headline is not None and 0.0 <= headline <= 1.0
