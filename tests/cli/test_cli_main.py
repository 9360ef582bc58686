"""fedhet.cli.main: list, describe, run (and its one-line config errors)."""

import json
import re

import pytest
import torch

from fedhet.cli.main import main
from fedhet.core.registry import ALGORITHMS
from fedhet.experiment.checkpoint import load_checkpoint

TINY = [
    "rounds=1",
    "data.dataset=synthetic",
    "data.num_clients=3",
    "model.options={hidden: [4]}",
    "local.max_steps=1",
    "logging.progress=off",
    "runtime.threads=1",
]


pytestmark = pytest.mark.usefixtures("keep_threads")


def test_list_names_every_algorithm(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index("algorithms:")
    section = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        section.append(line.split()[0])
    assert section == ALGORITHMS.names()
    assert "  fedprox      FedProx: FedAvg with a proximal term in the local objective." in lines
    for kind in ("models:", "datasets:", "partitioners:", "server optimizers:", "device policies:"):
        assert kind in lines


def test_describe_fedprox_shows_mu(capsys):
    assert main(["describe", "fedprox"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fedprox (algorithm)\n")
    assert "  mu         float, default 0.01: μ, weight of the proximal term (μ/2)‖θ − θ_g‖²; μ = 0 is FedAvg." in out
    assert "  weighting  str, default 'examples': client weights in the average" in out
    assert "https://arxiv.org/abs/1812.06127" in out


def test_describe_feddyn_shows_alpha(capsys):
    assert main(["describe", "feddyn"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  alpha +float, default 0.1: ", out, re.M) and re.search(r"^  weighting +str, default 'uniform': ", out, re.M)


def test_describe_other_kinds(capsys):
    assert main(["describe", "mlp"]) == 0
    assert capsys.readouterr().out.startswith("mlp (model)\n")
    assert main(["describe", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("synthetic (dataset)\n") and re.search(r"^  num_samples +int, default 1000: examples in all.$", out, re.M)


def test_describe_unknown_name_exits_2_with_allowed_names(capsys):
    assert main(["describe", "nosuch"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err
    assert err.startswith("fedhet describe: unknown name 'nosuch'; allowed: ")
    allowed = err.split("allowed: ", 1)[1].split(", ")
    assert set(ALGORITHMS.names()) <= set(allowed)


@pytest.mark.parametrize(
    "overrides, start",
    [
        (["algorithm.name=feddyn", "algorithm.alpha=0"], "fedhet: config error: algorithm.alpha: got 0, allowed: > 0"),
        (["algorithm.name=nosuch"], "fedhet: config error: algorithm.name: got 'nosuch', allowed: "),
        (["roundz=2"], "fedhet: config error: roundz: unknown key; allowed: "),
        # caught when the dataset is loaded (build_run), which must still come before the run directory
        (
            ["data.dataset=synthetic", "data.options={num_samplez: 30}"],
            "fedhet: config error: data.options: dataset 'synthetic': unknown option 'num_samplez'",
        ),
    ],
)
def test_run_with_a_bad_override_exits_2_with_one_line(tmp_path, capsys, overrides, start):
    run_dir = tmp_path / "run"
    assert main(["run", "--run-dir", str(run_dir), *overrides]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start)
    assert captured.out == ""
    assert not run_dir.exists()  # rejected before anything was written


def test_run_writes_the_run_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "--run-dir", str(run_dir), *TINY]) == 0
    out = capsys.readouterr().out
    assert out.startswith("final: eval/global/loss=") and "eval/global/accuracy=" in out
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.pt",
        "clients.jsonl",
        "commands.txt",
        "config.yaml",
        "dataset.json",
        "metrics.csv",
        "metrics.jsonl",
    ]
    assert load_checkpoint(run_dir)["round"] == 1
    described = json.loads((run_dir / "dataset.json").read_text())
    assert described["name"] == "synthetic" and described["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    assert (run_dir / "config.yaml").read_text().endswith(
        "# data: synthetic, 4 classes (class_0, class_1, class_2, class_3); see dataset.json\n"
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    assert (run_dir / "commands.txt").read_text() == f"fedhet run --run-dir {run_dir} {' '.join(TINY)}\n".replace(
        "model.options={hidden: [4]}", "'model.options={hidden: [4]}'"
    )


def test_run_with_a_config_file_and_overrides(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("rounds: 3\nalgorithm: {name: fedprox, mu: 0.5}\n")
    run_dir = tmp_path / "run"
    assert main(["run", str(path), *TINY, "--run-dir", str(run_dir)]) == 0
    saved = (run_dir / "config.yaml").read_text()
    assert "rounds: 1" in saved and "mu: 0.5" in saved and "name: fedprox" in saved


def test_resume_needs_a_run_directory(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path / "nothing"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedhet: config error: --resume: ") and "config.yaml" in err and "\n" not in err


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_may_extend_a_run_to_more_rounds_with_the_same_bits(tmp_path, capsys):
    TINY_ROUNDS = [a for a in TINY if not a.startswith("rounds=")]
    assert main(["run", *TINY_ROUNDS, "rounds=2", "--run-dir", str(tmp_path / "a")]) == 0
    assert main(["run", *TINY_ROUNDS, "rounds=3", "--resume", str(tmp_path / "a")]) == 0
    assert main(["run", *TINY_ROUNDS, "rounds=3", "--run-dir", str(tmp_path / "b")]) == 0
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a["round"] == b["round"] == 3
    for k, v in b["algorithm_state"].params.items():
        assert torch.equal(v, a["algorithm_state"].params[k]), k
    assert main(["run", *TINY_ROUNDS, "rounds=1", "--resume", str(tmp_path / "a")]) == 2
    assert "fewer than the run's 3" in capsys.readouterr().err
