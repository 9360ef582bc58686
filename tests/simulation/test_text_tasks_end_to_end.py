"""The depth methods run end to end on the transformer for token tagging and regression: the task
carried by the data picks the loss and the metrics, and every tier's model is scored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhet.core.registry import DATASETS
from fedhet.data.base import ArrayDataset
from fedhet.data.datasets import DatasetBundle
from fedhet.data.tasks import IGNORE, Regression, Tagging
from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.simulation.loop import run_rounds

pytestmark = pytest.mark.usefixtures("one_thread")

L, V = 8, 20
TAGS = ("O", "B-Drug", "I-Drug")


def _tokens(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (n, L), generator=g)
    ids[:, 0] = 2  # [CLS]
    x = torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], dim=1)
    x[:, 1, -2:] = 0  # the last two positions are padding
    x[:, 0, -2:] = 0
    return x


def _tagging(*, root=None, seed=0, **unknown) -> DatasetBundle:
    """Token ids >= 15 are drugs: B-Drug, and I-Drug when the previous token is one too."""

    def split(n, s):
        x = _tokens(n, s)
        ids = x[:, 0]
        drug = ids >= 15
        prev = torch.cat([torch.zeros(n, 1, dtype=torch.bool), drug[:, :-1]], dim=1)
        y = torch.where(drug, torch.where(prev, 2, 1), 0)
        y[:, 0] = IGNORE
        y[x[:, 1] == 0] = IGNORE
        return ArrayDataset(x, y, Tagging(TAGS))

    return DatasetBundle("tiny_tags", split(600, seed), split(200, seed + 1), len(TAGS), (3, L), TAGS,
                         model_options={"vocab_size": V, "output": "token"}, groups=np.arange(600) % 12)


def _regression(*, root=None, seed=0, **unknown) -> DatasetBundle:
    """The score is 5 × the share of token ids >= 12 among the real tokens."""

    def split(n, s):
        x = _tokens(n, s)
        real = x[:, 1].bool()
        y = ((x[:, 0] >= 12) & real).sum(1).float() / real.sum(1).float() * 5
        return ArrayDataset(x, y, Regression())

    return DatasetBundle("tiny_scores", split(600, seed), split(200, seed + 1), 1, (3, L), ("score",),
                         model_options={"vocab_size": V, "output": "sequence"})


@pytest.fixture
def tiny_text(monkeypatch):
    monkeypatch.setitem(DATASETS._entries, "tiny_tags", _tagging)
    monkeypatch.setitem(DATASETS._entries, "tiny_scores", _regression)


def _run(tmp_path, dataset, algorithm, *extra):
    cfg = load_config(None, [
        "rounds=4",
        f"data.dataset={dataset}",
        "data.num_clients=6",
        "model.name=transformer",
        "model.options={hidden: 16, heads: 2, ffn: 32, layers: 3, dropout: 0.0}",
        "devices.tiers=[{name: a, depth: 3}, {name: b, depth: 2}]",
        "local.optimizer=adamw",
        "local.lr=0.01",
        "local.epochs=2",
        "logging.progress=off",
        f"algorithm.name={algorithm}",
        *extra,
    ])
    return run_rounds(build_run(cfg, tmp_path / algorithm)).history[-1]


def test_inclusivefl_tags_drugs_per_tier(tmp_path, tiny_text):
    last = _run(tmp_path, "tiny_tags", "inclusivefl", "data.partitioner=natural")
    assert last["metric"] == "f1"
    assert {"eval/depth_3/f1", "eval/depth_3/f1/Drug", "eval/depth_2/f1", "clients/tier_a/f1/Drug_mean"} <= set(last)
    assert last["eval/depth_3/f1"] > 0.5


def test_depthfl_tags_with_distillation_over_scored_tokens(tmp_path, tiny_text):
    last = _run(tmp_path, "tiny_tags", "depthfl", "algorithm.kd_ramp=0")
    assert {"eval/ensemble/f1", "eval/exit_1/f1", "eval/exit_3/f1"} <= set(last)
    assert last["eval/ensemble/f1"] > 0.5


def test_depthfl_regression_needs_kd_off_and_then_learns(tmp_path, tiny_text):
    failed = _run(tmp_path, "tiny_scores", "depthfl")
    assert failed["trained"] == 0 and failed["failures"] > 0  # kd on a regression task: every client refuses
    last = _run(tmp_path, "tiny_scores", "depthfl", "algorithm.kd=false", "rounds=6")
    assert last["metric"] == "pearson"
    assert last["eval/ensemble/pearson"] > 0.5
