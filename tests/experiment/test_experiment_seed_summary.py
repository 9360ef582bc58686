"""`fedhet summarize`: the mean of the last K evaluations of every evaluated number, per comparison
folder (one a seed) and across them, on hand-written metrics files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedhet.cli.main import main
from fedhet.experiment.report import last_evaluations, markdown_seed_table, seed_summary


def _run(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _history(accs: list[float], half: list[float] | None = None) -> list[dict]:
    rows = []
    for i, a in enumerate(accs):
        rows.append({"round": 2 * i + 1, "train_loss": 1.0, "bytes_up": 10, "bytes_down": 5, "train_flops": 100.0})
        ev = {"round": 2 * i + 2, "bytes_up": 10, "bytes_down": 5, "train_flops": 100.0,
              "eval/global/accuracy": a, "eval/global/loss": 9.0, "eval/global/width": 1.0,
              "clients/accuracy_mean": a / 2, "clients/tier_a/accuracy_mean": a / 4}  # fmt: skip
        if half is not None:
            ev["eval/width_0.5/accuracy"] = half[i]
        rows.append(ev)
    return rows


def test_last_evaluations_by_hand():
    hist = _history([0.1, 0.2, 0.4, 0.6])
    got = last_evaluations(hist, 3)
    assert got["eval/global/accuracy"] == pytest.approx((0.2 + 0.4 + 0.6) / 3)
    assert got["clients/accuracy_mean"] == pytest.approx(0.2)
    assert got["clients/tier_a/accuracy_mean"] == pytest.approx(0.1)
    assert "eval/global/loss" not in got and "eval/global/width" not in got
    assert last_evaluations(hist, 1)["eval/global/accuracy"] == pytest.approx(0.6)
    assert last_evaluations(hist, 10)["eval/global/accuracy"] == pytest.approx(0.325)  # fewer evaluations: all of them
    with pytest.raises(ValueError, match="last: got 0, allowed: an integer >= 1"):
        last_evaluations(hist, 0)


def test_seed_summary_averages_each_seed_then_across_seeds(tmp_path, capsys):
    s0, s1 = tmp_path / "s0", tmp_path / "s1"
    _run(s0 / "A", _history([0.1, 0.5, 0.6, 0.7], half=[0.0, 0.3, 0.3, 0.6]))
    _run(s1 / "A", _history([0.2, 0.3, 0.3, 0.3], half=[0.0, 0.1, 0.2, 0.3]))
    _run(s0 / "B", _history([0.5, 0.5]))
    _run(s1 / "B", _history([0.1, 0.9]))
    _run(s0 / "only-in-s0", _history([0.9]))
    summary = seed_summary([s0, s1], last=3)
    assert list(summary["variants"]) == ["A", "B"]  # a variant missing from one seed is left out
    a = summary["variants"]["A"]
    assert a["values"]["eval/global/accuracy"]["seeds"] == pytest.approx([0.6, 0.3])
    assert a["values"]["eval/global/accuracy"]["mean"] == pytest.approx(0.45)
    assert a["values"]["eval/width_0.5/accuracy"]["mean"] == pytest.approx((0.4 + 0.2) / 2)
    assert a["rounds"] == [8, 8] and a["bytes_total"] == [120, 120] and a["train_flops"] == [800.0, 800.0]
    b = summary["variants"]["B"]
    assert b["values"]["eval/global/accuracy"]["seeds"] == pytest.approx([0.5, 0.5])  # only 2 evaluations
    table = markdown_seed_table(summary)
    lines = table.splitlines()
    assert lines[0] == (
        "| variant | global accuracy % | width_0.5 accuracy % | clients accuracy_mean % | rounds | communicated |"
    )
    assert (
        lines[2]
        == "| A | 45.00 (60.00 / 30.00) | 30.00 (40.00 / 20.00) | 22.50 (30.00 / 15.00) | 8 / 8 | 120.0 B / 120.0 B |"
    )
    assert lines[3].startswith("| B | 50.00 (50.00 / 50.00) | - |")

    out = tmp_path / "summary.json"
    assert main(["summarize", str(s0), str(s1), "--keys", "clients/tier_a/accuracy_mean", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| A | 11.25 (15.00 / 7.50) | 8 / 8 |" in printed
    assert json.loads(out.read_text())["variants"]["A"]["rounds"] == [8, 8]
    assert main(["summarize", str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'}: no run folder with a metrics.jsonl in it" in capsys.readouterr().err
