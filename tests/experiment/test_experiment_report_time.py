"""The time-to-accuracy table and the accuracy-against-time and -bytes plots, from hand-made metrics."""

from __future__ import annotations

import json

from fedhet.experiment.report import (
    default_targets,
    markdown_time_to_accuracy,
    progress_points,
    report_from_dirs,
    time_to_accuracy,
)


def _write(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


ROWS_A = [
    {
        "round": 1,
        "bytes_down": 100,
        "bytes_up": 50,
        "sim_time": 10.0,
        "metric": "accuracy",
        "eval/global/accuracy": 0.3,
    },
    {"round": 2, "bytes_down": 100, "bytes_up": 50, "sim_time": 25.0},
    {
        "round": 3,
        "bytes_down": 100,
        "bytes_up": 50,
        "sim_time": 30.0,
        "metric": "accuracy",
        "eval/global/accuracy": 0.6,
    },
]
ROWS_B = [
    {"round": 1, "bytes_down": 10, "bytes_up": 10, "sim_time": 4.0, "metric": "accuracy", "eval/global/accuracy": 0.5},
    {"round": 2, "bytes_down": 10, "bytes_up": 10, "sim_time": 8.0, "metric": "accuracy", "eval/global/accuracy": 0.55},
]


def test_time_to_accuracy_by_hand(tmp_path):
    _write(tmp_path / "A", ROWS_A)
    _write(tmp_path / "B", ROWS_B)
    dirs = {"A": tmp_path / "A", "B": tmp_path / "B"}
    # bytes are cumulative over every round, evaluated or not
    assert progress_points(ROWS_A) == [
        {"round": 1.0, "bytes": 150.0, "score": 0.3, "sim_time": 10.0},
        {"round": 3.0, "bytes": 450.0, "score": 0.6, "sim_time": 30.0},
    ]
    table = time_to_accuracy(dirs, [0.5, 0.6])
    assert table[0]["reached"] == {
        0.5: {"sim_time": 30.0, "bytes": 450.0, "round": 3.0},
        0.6: {"sim_time": 30.0, "bytes": 450.0, "round": 3.0},
    }
    assert table[1]["reached"] == {0.5: {"sim_time": 4.0, "bytes": 20.0, "round": 1.0}, 0.6: None}
    text = markdown_time_to_accuracy(table, [0.5, 0.6], "accuracy")
    assert "| B | 4 seconds | 20 bytes | 1 | - | - | - |" in text
    # best scores 0.6 and 0.55: the median (upper middle of two) is 0.6; 50%, 75%, 100% of it
    assert default_targets(dirs) == [0.3, 0.45, 0.6]
    report_from_dirs([tmp_path / "A", tmp_path / "B"], tmp_path / "report", targets=[0.5])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| A | 30 seconds | 450 bytes | 3 |" in md
    assert (tmp_path / "report" / "accuracy_time.png").is_file() and (
        tmp_path / "report" / "accuracy_bytes.png"
    ).is_file()
