"""What the executor tests share: a small run of any algorithm on any executor, and comparisons."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from fedhet.algorithms.fedavg import FedAvg
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientResult, ClientTask
from fedhet.core.registry import ALGORITHMS as ALGORITHM_REGISTRY
from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.simulation.loop import Run, RunResult, run_rounds

#: every registered algorithm; sub-model ones train three widths (tiers a-c)
ALGORITHMS = ALGORITHM_REGISTRY.names()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Workers run single-threaded; the sequential run in this process must too, or some CPU kernels
    round differently (with 2 threads the MLP's results already differ in the last bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging if the executor ever waits forever."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_overrides(executor: str, algorithm: str = "fedavg", *extra: str) -> list[str]:
    """The config of the executor tests' small run (7 clients of synthetic data, an MLP, 3 rounds)."""
    return [
        "rounds=3",
        "data.dataset=synthetic",
        "data.num_clients=7",
        "model.name=mlp",
        f"runtime.executor={executor}",
        "runtime.workers=2",
        "runtime.device=cpu",
        "logging.progress=off",
        f"algorithm.name={algorithm}",
        "devices.tiers=a1-b1-c1",
        *extra,
    ]


def make_run(tmp_path: Path, executor: str, algorithm: str = "fedavg", *extra: str) -> Run:
    return build_run(load_config(None, run_overrides(executor, algorithm, *extra)), tmp_path / executor)


def finish(run: Run, seconds: int = 60) -> RunResult:
    with deadline(seconds), run.executor:
        return run_rounds(run)


def assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    else:
        assert a == b, where


def comparable(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def algorithm_options(algorithm: str) -> tuple[str, ...]:
    """What an algorithm needs on these runs: depth-tiered algorithms (InclusiveFL) train three depths
    of a three-layer MLP, DisPFL tiers that differ in density."""
    if algorithm == "inclusivefl":
        return ("model.options={hidden: [16, 16, 16]}", "devices.tiers=[{name: a, depth: 3}, {name: b, depth: 2}, {name: c, depth: 2}]")
    if algorithm == "dispfl":
        return ("algorithm.neighbours=3", "devices.tiers=[{name: a, density: 0.5}, {name: b, density: 0.3}]")
    return ()


@dataclass(frozen=True, kw_only=True)
class FailsOnClient(FedAvg):
    """FedAvg whose client ``bad`` raises (or, with ``crash``, kills its own process)."""

    bad: int = 2
    crash: bool = False

    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        if ctx.client.id == self.bad:
            if self.crash:
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("injected failure")
        return super().local_update(task, ctx)
