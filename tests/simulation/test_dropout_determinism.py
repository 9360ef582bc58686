"""Randomness inside a model (dropout) is keyed by (seed, round, client) like every other draw: a run
gives the same bits whatever ran before it in the process, and the parallel executor gives the
sequential executor's bits."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from executor_cases import assert_same_tensors, finish, make_run, one_thread  # noqa: F401  (an autouse fixture)
from torch import nn

from fedhet.core.messages import ModelSize
from fedhet.core.registry import MODELS

NAME = "test_mlp_dropout"


def _mlp_dropout(*, input_shape: tuple[int, ...], num_classes: int, size: ModelSize, p: float = 0.5) -> nn.Module:
    """An MLP with dropout (a test model)."""
    width = max(1, round(16 * size.width))
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU(), nn.Dropout(p), nn.Linear(width, num_classes))


@pytest.fixture(autouse=True)
def dropout_model():
    """The test model is registered for this module's tests only (other tests go over every model)."""
    MODELS.register(NAME)(_mlp_dropout)
    yield
    MODELS.unregister(NAME)

EXTRA = (f"model.name={NAME}", "model.options={}")


def _params(tmp_path, name: str, executor: str) -> dict[str, Any]:
    run = make_run(tmp_path / name, executor, "fedavg", *EXTRA)
    return finish(run).params


def test_dropout_does_not_depend_on_what_ran_before(tmp_path):
    torch.manual_seed(1)
    first = _params(tmp_path, "a", "sequential")
    torch.manual_seed(2)
    torch.rand(1000)  # the global generator is somewhere else entirely
    second = _params(tmp_path, "b", "sequential")
    assert_same_tensors(first, second)


@pytest.mark.skipif(not hasattr(torch, "multiprocessing"), reason="needs torch.multiprocessing")
def test_dropout_is_the_same_on_the_parallel_executor(tmp_path):
    sequential = _params(tmp_path, "s", "sequential")
    parallel = _params(tmp_path, "p", "parallel")
    assert_same_tensors(sequential, parallel)
