"""Resuming a run gives the same bits as never stopping: killed CLI runs, and in-process resumes."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedhet.experiment.build import build_run
from fedhet.experiment.checkpoint import load_checkpoint
from fedhet.experiment.config import load_config
from fedhet.simulation.loop import run_rounds

ROOT = Path(__file__).resolve().parents[2]

# ~0.2-0.5 s per round on one thread: slow enough to be killed part-way, fast enough for the suite
CLI_OVERRIDES = [
    "rounds=6",
    "data.dataset=digits",
    "data.num_clients=4",
    "model.options={hidden: [32]}",
    "local.epochs=8",
    "local.batch_size=16",
    "eval.clients=false",
    "runtime.threads=1",
    "logging.progress=off",
]
ALGORITHMS = {"fedavg": [], "feddyn": ["algorithm.name=feddyn", "algorithm.alpha=0.1"]}


def flatten(obj, prefix=""):
    """(path, leaf) pairs of a state: dataclasses, dicts, tuples and lists walked down to tensors/scalars."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from flatten(getattr(obj, f.name), f"{prefix}.{f.name}")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from flatten(obj[k], f"{prefix}[{k!r}]")
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def assert_same_bits(a, b):
    fa, fb = dict(flatten(a)), dict(flatten(b))
    assert fa.keys() == fb.keys()
    for path, va in fa.items():
        vb = fb[path]
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and torch.equal(va, vb), path
        else:
            assert va == vb, path


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _complete_lines(path):
    """Rows fully written so far (the writer may be mid-line)."""
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "fedhet.cli.main", "run", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """Each algorithm's CLI run, killed with SIGKILL once it has logged >= 2 rounds. The two
    algorithms' runs go side by side (a fresh interpreter costs ~5 s of imports on its own)."""
    base = tmp_path_factory.mktemp("resume")
    dirs = {name: base / name for name in ALGORITHMS}
    procs = {name: _cli("--run-dir", str(dirs[name]), *CLI_OVERRIDES, *extra) for name, extra in ALGORITHMS.items()}
    killed_at = {}
    deadline = time.monotonic() + 240
    try:
        while len(killed_at) < len(procs):
            assert time.monotonic() < deadline, "the first runs never got to round 2"
            for name, proc in procs.items():
                if name in killed_at:
                    continue
                rows = _complete_lines(dirs[name] / "metrics.jsonl")
                if rows >= 2:
                    assert proc.poll() is None, (
                        f"{name}: the run finished before it could be killed; make rounds slower"
                    )
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed_at[name] = rows
                elif proc.poll() is not None:
                    raise AssertionError(f"{name}: the first run exited early:\n{proc.communicate()[1]}")
            time.sleep(0.005)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    return dirs, killed_at, {name: load_checkpoint(dirs[name]) for name in ALGORITHMS}


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_killed_cli_run_resumes_to_the_same_bits(name, interrupted, tmp_path, one_thread, capsys):
    from fedhet.cli.main import main

    dirs, killed_at, checkpoints = interrupted
    assert killed_at[name] < 6
    # the kill came after round 2 was logged; the checkpoint on disk was round 1 or later, never the end
    assert checkpoints[name] is not None and 1 <= checkpoints[name]["round"] < 6

    # a resume with a different config is refused before anything is touched
    assert main(["run", "--resume", str(dirs[name]), *CLI_OVERRIDES, *ALGORITHMS[name], "local.lr=0.5"]) == 2
    assert "differs from the run's saved config in: local" in capsys.readouterr().err
    assert load_checkpoint(dirs[name])["round"] == checkpoints[name]["round"]

    # `fedhet run --resume D <same overrides>`: the CLI entry point, in this process
    assert main(["run", "--resume", str(dirs[name]), *CLI_OVERRIDES, *ALGORITHMS[name]]) == 0, capsys.readouterr().err

    # metrics and client rows: exactly one per round (rows past the checkpoint were redone, not doubled)
    assert [r["round"] for r in _rows(dirs[name] / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    clients = [(r["round"], r["client"]) for r in _rows(dirs[name] / "clients.jsonl")]
    assert clients == [(rnd, c) for rnd in range(1, 7) for c in range(4)]
    csv_lines = (dirs[name] / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 6

    # the uninterrupted run, same overrides, separate run directory (runtime.threads=1 as in the CLI runs)
    cfg = load_config(None, [*CLI_OVERRIDES, *ALGORITHMS[name]])
    run = build_run(cfg, tmp_path / "straight")
    result = run_rounds(run)

    final = load_checkpoint(dirs[name])
    assert final["round"] == 6
    assert_same_bits(final["algorithm_state"].params, result.state.params)
    assert_same_bits(final["algorithm_state"], result.state)
    if name == "feddyn":
        assert sorted(final["store"]) == [0, 1, 2, 3]
        assert_same_bits(final["store"], run.executor.store.snapshot())
    for mine, theirs in zip(_rows(dirs[name] / "metrics.jsonl"), result.history, strict=True):
        assert mine["train_loss"] == theirs["train_loss"]
        assert mine["eval/global/accuracy"] == theirs["eval/global/accuracy"]


# -- in-process ----------------------------------------------------------------------------------

INPROC = [
    "data.dataset=synthetic",
    "data.num_clients=5",
    "model.options={hidden: [8]}",
    "local.batch_size=32",
    "selection.clients_per_round=3",
    "logging.progress=off",
]


@pytest.mark.parametrize(
    "extra",
    [
        ["server.name=fedadam", "server.lr=0.05"],
        ["algorithm.name=feddyn", "algorithm.alpha=0.1"],
        ["algorithm.name=fedprox", "algorithm.mu=0.1", "devices.dropout=0.3"],
        ["algorithm.name=local", "devices.tiers=a1-b1"],
    ],
    ids=["fedadam", "feddyn", "fedprox-dropout", "local"],
)
def test_resume_in_process_equals_a_straight_run(tmp_path, extra, one_thread):
    torch.set_num_threads(1)
    first = build_run(load_config(None, [*INPROC, *extra, "rounds=2"]), tmp_path / "stopped")
    run_rounds(first)
    assert load_checkpoint(tmp_path / "stopped")["round"] == 2

    again = build_run(load_config(None, [*INPROC, *extra, "rounds=4"]), tmp_path / "stopped")
    resumed = run_rounds(again, resume=True)
    straight_run = build_run(load_config(None, [*INPROC, *extra, "rounds=4"]), tmp_path / "straight")
    straight = run_rounds(straight_run)

    assert_same_bits(resumed.state, straight.state)
    assert "local" in extra[0] or any(isinstance(v, torch.Tensor) for _, v in flatten(straight.state))
    assert resumed.params.keys() == straight.params.keys()
    assert all(torch.equal(resumed.params[k], straight.params[k]) for k in straight.params)
    snap, ref = again.executor.store.snapshot(), straight_run.executor.store.snapshot()
    assert sorted(snap) == sorted(ref)
    assert_same_bits(snap, ref)
    assert bool(ref) == ("feddyn" in extra[0] or "local" in extra[0])
    assert [r["round"] for r in resumed.history] == [1, 2, 3, 4]
    assert [r["round"] for r in _rows(tmp_path / "stopped" / "metrics.jsonl")] == [1, 2, 3, 4]
    for a, b in zip(resumed.history, straight.history, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}

    # resuming a finished run does nothing more
    done = run_rounds(build_run(load_config(None, [*INPROC, *extra, "rounds=4"]), tmp_path / "stopped"), resume=True)
    assert_same_bits(done.state, straight.state)
    assert [r["round"] for r in done.history] == [1, 2, 3, 4]


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, one_thread):
    torch.set_num_threads(1)
    a = run_rounds(build_run(load_config(None, [*INPROC, "rounds=1"]), tmp_path / "a"), resume=True)
    b = run_rounds(build_run(load_config(None, [*INPROC, "rounds=1"]), tmp_path / "b"))
    assert_same_bits(a.state, b.state)
