"""Run directories: one run writes a folder at a time (a second run or a resume is refused, naming the
holder's PID; the lock of a killed run never blocks), a fresh run into a folder that holds an
earlier run is refused unless --overwrite (per variant folder for `fedhet compare --out`), the
temporary files of a killed run are removed, and a damaged latest checkpoint is a one-line error
while --from-previous resumes from the one before it, to the same bits as a run that never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from processes import alive, gone

from fedhet.cli.main import main
from fedhet.experiment.checkpoint import LATEST, PREVIOUS, load_checkpoint
from fedhet.experiment.rundir import LOCK, holder, locked

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "data.dataset=synthetic",
    "data.num_clients=3",
    "model.options={hidden: [4]}",
    "local.max_steps=2",
    "logging.progress=off",
    "runtime.threads=1",
]


pytestmark = pytest.mark.usefixtures("keep_threads")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("fedhet: config error: ")
    return lines[0]


def test_a_folder_in_use_is_refused_naming_the_pid_and_a_killed_runs_lock_and_temporary_files_do_not_stay(
    tmp_path, capsys
):
    run_dir = tmp_path / "run"
    # a run whose first round outlasts the test: it holds the folder until it is killed
    slow = [*TINY, "local.max_steps=100000000", "local.epochs=100000", "rounds=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "fedhet.cli.main", "run", "--run-dir", str(run_dir), *slow],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / LOCK).exists() and (run_dir / LOCK).read_text().strip() == str(first.pid)):
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the first run never took the folder's lock"
            time.sleep(0.1)
        for argv in (["run", "--run-dir", str(run_dir), "--overwrite", *TINY], ["run", "--resume", str(run_dir)]):
            assert main(argv) == 2
            line = _one_line(capsys)
            assert f"run directory {run_dir} is in use by another fedhet run (pid {first.pid};" in line
            assert f"lock file {run_dir / LOCK}" in line
        first.send_signal(signal.SIGKILL)  # the process this test started
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # what a killed run leaves: its lock file (naming a dead PID) and half-written temporary files
    assert (run_dir / LOCK).read_text().strip() == str(first.pid)
    stale = [
        run_dir / ".checkpoint.pt.k1ll3d.tmp",
        run_dir / ".metrics.csv.x7.tmp",
        run_dir / ".checkpoint.prev.pt.123.tmp",
    ]
    for path in stale:
        path.write_bytes(b"half a file")
    assert (
        main(["run", "--run-dir", str(run_dir), "rounds=1", *TINY]) == 0
    )  # it finished no round: nothing to overwrite
    assert not any(path.exists() for path in stale)
    assert not (run_dir / LOCK).exists()  # released when the run ended
    assert [r["round"] for r in _rows(run_dir)] == [1]


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK).write_text(f"{dead.pid}\n")
    with locked(run_dir):
        assert (run_dir / LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(ValueError, match=f"in use by another fedhet run \\(pid {os.getpid()};"):
            with locked(run_dir):
                pass
    assert not (run_dir / LOCK).exists()


HOLD_AND_FORK = """
import os, sys, time
from fedhet.experiment.rundir import locked

with locked(sys.argv[1]):
    child = os.fork()
    if child == 0:  # a worker forked while the run holds its folder
        time.sleep(3)
        os._exit(0)
    with open(sys.argv[2], "w") as f:
        f.write(str(child))
    os._exit(0)  # the run dies without releasing anything
"""


def test_a_process_forked_by_a_run_does_not_keep_its_folder_locked(tmp_path):
    run_dir, pid_file, log = tmp_path / "run", tmp_path / "child.pid", tmp_path / "log"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as f:  # a file, not a pipe: the forked child keeps a copy of it
        code = subprocess.run(
            [sys.executable, "-c", HOLD_AND_FORK, str(run_dir), str(pid_file)], env=env, stdout=f, stderr=f, timeout=120
        ).returncode
    assert code == 0, log.read_text()
    child = int(pid_file.read_text())
    assert alive(child)  # still running, with a copy of every descriptor its parent had
    assert holder(run_dir) is None
    with locked(run_dir):
        pass
    assert gone({child}, 20)


def test_a_finished_folder_is_refused_without_overwrite_and_replaced_with_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "--run-dir", str(run_dir), "rounds=2", *TINY]) == 0
    capsys.readouterr()
    assert main(["run", "--run-dir", str(run_dir), "rounds=1", *TINY]) == 2
    line = _one_line(capsys)
    assert line == (
        f"fedhet: config error: --run-dir: {run_dir} holds a finished run (2 of 2 rounds); allowed: another folder, "
        f"--resume {run_dir} to continue or extend it (rounds=N), or --overwrite to replace it"
    )
    assert [r["round"] for r in _rows(run_dir)] == [1, 2] and load_checkpoint(run_dir)["round"] == 2
    assert main(["run", "--overwrite", "--resume", str(run_dir)]) == 2
    assert "--resume and --overwrite: got both" in _one_line(capsys)

    assert main(["run", "--run-dir", str(run_dir), "--overwrite", "rounds=1", "seed=5", *TINY]) == 0
    assert [r["round"] for r in _rows(run_dir)] == [1]
    assert load_checkpoint(run_dir)["round"] == 1
    assert not (run_dir / PREVIOUS).exists()  # the earlier run's checkpoints went with it
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 5


def test_compare_refuses_variant_folders_that_hold_runs_unless_overwrite(tmp_path, capsys):
    spec = {
        "name": "cmp",
        "base": {"rounds": 1, "data": {"dataset": "synthetic", "num_clients": 3}, "model": {"options": {"hidden": [4]}},
                 "local": {"max_steps": 1}, "runtime": {"threads": 1}},
        "variants": {"a": {}, "b": {"seed": 1}},
    }  # fmt: skip
    config, out = tmp_path / "cmp.yaml", tmp_path / "out"
    config.write_text(yaml.safe_dump(spec))
    assert main(["compare", str(config), "--out", str(out), "--progress", "off"]) == 0
    capsys.readouterr()
    written = {v: (out / v / "metrics.jsonl").stat().st_mtime_ns for v in ("a", "b")}

    assert main(["compare", str(config), "--out", str(out), "--only", "b", "--progress", "off"]) == 2
    line = _one_line(capsys)
    assert (
        f"--out (variant 'b'): {out / 'b'} holds a finished run (1 of 1 rounds); allowed: another folder, or --overwrite"
        in line
    )
    assert main(["compare", str(config), "--out", str(out), "--only", "b", "--overwrite", "--progress", "off"]) == 0
    capsys.readouterr()
    assert (out / "a" / "metrics.jsonl").stat().st_mtime_ns == written["a"]  # not run again
    assert (out / "b" / "metrics.jsonl").stat().st_mtime_ns != written["b"]

    # --only adds a new variant into the existing folder without --overwrite
    spec["variants"]["c"] = {"seed": 2}
    config.write_text(yaml.safe_dump(spec))
    assert main(["compare", str(config), "--out", str(out), "--only", "c", "--progress", "off"]) == 0
    assert sorted(r["variant"] for r in json.loads((out / "summary.json").read_text())) == ["a", "b", "c"]


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_damaged_checkpoint_is_one_line_and_from_previous_resumes_to_the_same_bits(tmp_path, capsys, store):
    run = [*TINY, "algorithm.name=feddyn", "algorithm.alpha=0.1", f"runtime.store={store}", "rounds=3"]
    run_dir, straight = tmp_path / "run", tmp_path / "straight"
    assert main(["run", "--run-dir", str(run_dir), *run]) == 0
    assert main(["run", "--run-dir", str(straight), *run]) == 0
    capsys.readouterr()
    expected = _rows(straight)
    latest = run_dir / LATEST
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])  # cut short

    assert main(["run", "--resume", str(run_dir), "rounds=4"]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"fedhet: config error: checkpoint {latest}: cannot be read (")
    assert f"fedhet run --resume {run_dir} --from-previous" in line
    assert main(["run", "--run-dir", str(run_dir), "--from-previous", *run]) == 2
    assert "--from-previous: given without --resume" in _one_line(capsys)

    assert main(["run", "--resume", str(run_dir), "--from-previous"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    # round 3 was redone from round 2's checkpoint: one row per round, the same as never stopping
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for mine, theirs in zip(rows, expected, strict=True):
        assert {k: v for k, v in mine.items() if k != "seconds"} == {k: v for k, v in theirs.items() if k != "seconds"}
    got, want = load_checkpoint(run_dir), load_checkpoint(straight)
    assert got["round"] == want["round"] == 3
    assert got["algorithm_state"].params.keys() == want["algorithm_state"].params.keys()
    assert all(
        torch.equal(got["algorithm_state"].params[k], want["algorithm_state"].params[k])
        for k in want["algorithm_state"].params
    )
    assert load_checkpoint(run_dir, previous=True)["round"] == 2


def test_from_previous_needs_a_previous_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "--run-dir", str(run_dir), "rounds=1", *TINY]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir), "--from-previous", "rounds=2"]) == 2
    assert f"--from-previous: {run_dir / PREVIOUS} does not exist" in _one_line(capsys)
    assert load_checkpoint(run_dir)["round"] == 1
