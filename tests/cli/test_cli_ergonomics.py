"""CLI ergonomics: overrides after flags, the run folder named after the algorithm actually run,
``--resume RUN_DIR`` alone, a finished run said to be finished, the closing table, help text on
every argument, and plots whose many variants stay distinguishable."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from fedhet.cli.main import build_parser, main
from fedhet.experiment.report import style

TINY = [
    "data.dataset=synthetic",
    "data.num_clients=3",
    "model.name=mlp",
    "model.options.hidden=[8]",
    "--progress",
    "off",
]


def test_every_argument_has_help():
    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{path} {action.dest}")

    walk(build_parser(), "fedhet")
    assert missing == []


def test_run_name_follows_an_algorithm_override(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "digits-fedavg", "rounds": 1, "algorithm": {"name": "fedavg"},
                                      "logging": {"dir": str(tmp_path / "runs")}}))  # fmt: skip
    assert main(["run", str(config), "--device", "cpu", "algorithm.name=fedprox", *TINY]) == 0
    out = capsys.readouterr().out
    folders = [p.name for p in (tmp_path / "runs").iterdir()]
    assert len(folders) == 1 and folders[0].startswith("digits-fedprox-")
    assert yaml.safe_load((tmp_path / "runs" / folders[0] / "config.yaml").read_text())["name"] == "digits-fedprox"
    # the closing table names the algorithm run, and the last line is the run folder
    assert "fedprox" in out and out.strip().splitlines()[-1] == f"run folder: {tmp_path / 'runs' / folders[0]}"
    # a config name without the algorithm's gets it appended; an explicit name= wins
    config.write_text(yaml.safe_dump({"name": "mine", "rounds": 1, "logging": {"dir": str(tmp_path / "r2")}}))
    assert main(["run", str(config), "algorithm.name=feddyn", *TINY]) == 0
    assert [p.name.rsplit("-", 2)[0] for p in (tmp_path / "r2").iterdir()] == ["mine-feddyn"]
    assert main(["run", str(config), "algorithm.name=feddyn", "name=kept", *TINY]) == 0
    assert sorted(p.name.rsplit("-", 2)[0] for p in (tmp_path / "r2").iterdir()) == ["kept", "mine-feddyn"]


def test_resume_alone_continues_from_the_saved_config_and_a_finished_run_says_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "--run-dir", str(run_dir), "rounds=2", "seed=3", *TINY]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert (
        capsys.readouterr().out.strip()
        == f"run {run_dir} is finished: 2 of 2 rounds; pass rounds=N (N > 2) to extend it"
    )
    assert main(["run", "--resume", str(run_dir), "rounds=3", "--progress", "off"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 3
    assert main(["run", "--resume", str(run_dir), "--run-dir", str(tmp_path / "x")]) == 2
    assert "--resume and --run-dir: got both" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "has no config.yaml; allowed: a run directory fedhet wrote" in capsys.readouterr().err


def test_unknown_flags_still_fail():
    with pytest.raises(SystemExit):
        main(["run", "rounds=1", "--no-such-flag"])


def test_forty_variants_get_forty_distinct_styles():
    looks = {(tuple(style(i)["color"]), style(i)["marker"], style(i)["linestyle"]) for i in range(40)}
    assert len(looks) == 40


def test_width_plot_and_curves_render_many_variants(tmp_path):
    from fedhet.experiment.report import plot_curves, plot_widths

    rows = [{"variant": f"v{i}", "width_accuracy": {"1": 0.5 + i / 100}} for i in range(8)]
    rows.append({"variant": "multi", "width_accuracy": {"1": 0.7, "0.5": 0.6, "0.25": 0.4}})
    assert plot_widths(rows, tmp_path / "w.png", "t") == tmp_path / "w.png"
    dirs = {}
    for i in range(12):
        d = tmp_path / f"r{i}"
        d.mkdir()
        key = "clients/accuracy_mean" if i == 0 else "eval/global/accuracy"
        (d / "metrics.jsonl").write_text(
            "".join(json.dumps({"round": r, "metric": "accuracy", key: r / 10}) + "\n" for r in (1, 2))
        )
        dirs[f"v{i}"] = d
    path = plot_curves(dirs, tmp_path / "c.png", "t")
    assert path is not None and Path(path).stat().st_size > 0
