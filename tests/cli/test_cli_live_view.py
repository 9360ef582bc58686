"""``fedhet run`` and ``compare`` say where the TensorBoard logs (and the MLflow runs) go and the
command that shows them, and record the command lines that made a folder."""

from __future__ import annotations

import shlex

import pytest

from fedhet.cli.main import main

pytest.importorskip("tensorboard", reason='the tensorboard sink needs tensorboard: pip install "fedhet[tensorboard]"')

pytestmark = pytest.mark.usefixtures("keep_threads")

TINY = [
    "rounds=2",
    "data.dataset=synthetic",
    "data.num_clients=3",
    "model.options={hidden: [4]}",
    "local.max_steps=1",
    "logging.progress=off",
    "runtime.threads=1",
]


def test_run_prints_the_tensorboard_command_and_records_its_commands(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["run", *TINY, "logging.sinks=[tensorboard]", "--run-dir", str(run_dir)]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    logdir = run_dir / "tensorboard"
    line = f"TensorBoard: logs in {logdir}; view them with: tensorboard --logdir {logdir}"
    assert err[:2] == [f"run directory: {run_dir}", line]
    assert list(logdir.glob("events.out.tfevents.*"))
    # resumed (extended): the same folder, the same line; both commands recorded
    assert main(["run", "--resume", str(run_dir), "rounds=3"]) == 0
    assert line in capsys.readouterr().err.splitlines()
    assert (run_dir / "commands.txt").read_text().splitlines() == [
        "fedhet " + shlex.join(argv),
        f"fedhet run --resume {run_dir} rounds=3",
    ]


def test_compare_prints_one_tensorboard_folder_for_its_variants(tmp_path, capsys):
    path = tmp_path / "cmp.yaml"
    path.write_text(
        "name: live\n"
        "base: {rounds: 1, data: {dataset: synthetic, num_clients: 3}, model: {options: {hidden: [4]}},\n"
        "       local: {max_steps: 1}, runtime: {threads: 1}, logging: {progress: 'off', sinks: [tensorboard]}}\n"
        "variants: {A: {}, B: {algorithm: {name: fedprox, mu: 0.1}}}\n"
    )
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    logdir = out / "tensorboard"
    assert f"TensorBoard: logs in {logdir}; view them with: tensorboard --logdir {logdir}" in captured.err.splitlines()
    assert sorted(p.name for p in logdir.iterdir()) == ["A", "B"]
    assert f"report: {out / 'report.md'}  html: {out / 'report.html'}" in captured.out
    assert (out / "commands.txt").read_text() == f"fedhet compare {path} --out {out}\n"


def test_mlflow_runs_go_beside_the_run_folders_by_default(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow", reason='the mlflow sink needs mlflow: pip install "fedhet[mlflow]"')
    monkeypatch.chdir(tmp_path)
    assert main(["run", *TINY, "logging.sinks=[mlflow]", "logging.dir=runs", "--run-dir", "runs/one"]) == 0
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlruns' / 'mlflow.db'}"
    line = f"MLflow: runs in {uri}; view them with: mlflow ui --backend-store-uri {uri}"
    assert line in capsys.readouterr().err.splitlines()
    assert (tmp_path / "runs" / "mlruns" / "mlflow.db").is_file()
    assert list((tmp_path / "runs" / "mlruns" / "artifacts").rglob("metrics.csv"))
