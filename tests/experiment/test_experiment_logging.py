"""fedhet.experiment.logging and compare: run files, resume truncation, comparisons."""

import csv
import json
import math

import pytest

from fedhet.experiment.compare import headline_metric, load_comparison, summarize
from fedhet.experiment.config import ConfigError
from fedhet.experiment.logging import CLIENTS, CSV, METRICS, RunLog, read_jsonl


def test_log_round_writes_jsonl_csv_and_clients(tmp_path):
    log = RunLog(tmp_path)
    log.log_round({"round": 1, "loss": 0.5}, [{"round": 1, "client": 0, "x": math.nan}])
    log.log_round({"round": 2, "loss": math.inf, "acc": 0.75}, [{"round": 2, "client": 1}])
    assert read_jsonl(tmp_path / METRICS) == [{"round": 1, "loss": 0.5}, {"round": 2, "loss": None, "acc": 0.75}]
    assert read_jsonl(tmp_path / CLIENTS) == [{"round": 1, "client": 0, "x": None}, {"round": 2, "client": 1}]
    with open(tmp_path / CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"round": "1", "loss": "0.5", "acc": ""}, {"round": "2", "loss": "", "acc": "0.75"}]
    assert log.rows == read_jsonl(tmp_path / METRICS)


def test_client_rows_are_written_as_json_dumps_writes_them(tmp_path):
    rows = [
        {"round": 1, "client": 3, "train_loss": 0.1 + 0.2, "tier": "w0.5", "ok": True, "none": None},
        {"round": 1, "client": 4, "train_loss": -math.inf, "nested": [1.0, 2]},
    ]
    RunLog(tmp_path).log_round({"round": 1}, rows)
    lines = (tmp_path / CLIENTS).read_text().splitlines()
    assert lines[0] == json.dumps(rows[0])  # a finite row as it is
    assert lines[1] == json.dumps({**rows[1], "train_loss": None})  # a non-finite value as null


def test_resume_drops_rows_after_the_checkpoint_and_a_cut_line(tmp_path):
    (tmp_path / METRICS).write_text("".join(json.dumps({"round": r}) + "\n" for r in (1, 2, 3)) + '{"round": 4, "lo')
    (tmp_path / CLIENTS).write_text("".join(json.dumps({"round": r, "client": 0}) + "\n" for r in (1, 2, 3)))
    log = RunLog(tmp_path, resume_round=2)
    assert log.rows == [{"round": 1}, {"round": 2}]
    assert read_jsonl(tmp_path / METRICS) == [{"round": 1}, {"round": 2}]
    assert [r["round"] for r in read_jsonl(tmp_path / CLIENTS)] == [1, 2]
    log.log_round({"round": 3}, [])
    assert [r["round"] for r in read_jsonl(tmp_path / METRICS)] == [1, 2, 3]


def test_the_csv_is_appended_to_and_rewritten_when_a_column_appears(tmp_path):
    log = RunLog(tmp_path)
    rows = [
        {"round": 1, "loss": 0.5},
        {"round": 2, "loss": 0.4},
        {"round": 3, "loss": 0.3, "acc": 0.9},
        {"round": 4, "loss": 0.2},
    ]
    for r in rows:
        log.log_round(r, [])
    with open(tmp_path / CSV, newline="") as f:
        got = list(csv.DictReader(f))
    assert got == [{"round": str(r["round"]), "loss": str(r["loss"]), "acc": str(r.get("acc", ""))} for r in rows]
    # resumed after round 2: the CSV is rebuilt from the rows kept
    log = RunLog(tmp_path, resume_round=2)
    log.log_round({"round": 3, "loss": 0.35}, [])
    with open(tmp_path / CSV, newline="") as f:
        got = list(csv.DictReader(f))
    assert [(r["round"], r["loss"]) for r in got] == [("1", "0.5"), ("2", "0.4"), ("3", "0.35")]
    assert not (tmp_path / CLIENTS).exists() or read_jsonl(tmp_path / CLIENTS) == []


@pytest.mark.parametrize(
    "client_rows, evaluated, expected",
    [
        (1, (), [1, 2, 3, 4, 5, 6]),
        (2, (), [2, 4, 6]),
        (2, (3,), [2, 3, 4, 6]),
        ("eval", (3, 6), [3, 6]),
        ("eval", (), []),
    ],
)
def test_client_rows_every_k_rounds_and_always_in_evaluation_rounds(tmp_path, client_rows, evaluated, expected):
    from fedhet.simulation.loop import _client_rows_due

    due = [r for r in range(1, 7) if _client_rows_due(client_rows, r, r in evaluated)]
    assert due == expected


def test_client_rows_in_a_run(tmp_path):
    from fedhet.experiment.build import build_run
    from fedhet.experiment.config import load_config
    from fedhet.simulation.loop import run_rounds

    base = ["data.dataset=synthetic", "data.num_clients=4", "model.options={hidden: [4]}", "local.max_steps=1"]
    cfg = load_config(None, [*base, "rounds=6", "eval.every=3", "logging.client_rows=eval", "logging.progress=off"])
    run = build_run(cfg, tmp_path / "eval")
    run_rounds(run)
    rows = read_jsonl(tmp_path / "eval" / CLIENTS)
    assert sorted({r["round"] for r in rows}) == [3, 6]
    assert all("eval_accuracy" in r for r in rows) and len(rows) == 8
    with pytest.raises(ConfigError, match="logging.client_rows"):
        load_config(None, [*base, "logging.client_rows=0"])
    with pytest.raises(ConfigError, match="logging.client_rows"):
        load_config(None, [*base, "logging.client_rows=often"])


def test_a_fresh_log_removes_old_files(tmp_path):
    for name in (METRICS, CLIENTS, CSV):
        (tmp_path / name).write_text("old\n")
    RunLog(tmp_path)
    assert not any((tmp_path / n).exists() for n in (METRICS, CLIENTS, CSV))


def test_read_jsonl_stops_at_a_broken_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    assert read_jsonl(tmp_path / "x.jsonl") == [{"a": 1}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_load_comparison_merges_variants_over_the_base(tmp_path):
    path = tmp_path / "cmp.yaml"
    path.write_text(
        "name: t\n"
        "base: {rounds: 2, local: {lr: 0.1, epochs: 2}, model: {options: {hidden: [8, 8]}}}\n"
        "variants:\n"
        "  A: {algorithm: {name: fedprox, mu: 0.5}, local: {lr: 0.2}}\n"
        "  B: {model: {options: {hidden: [4]}}}\n"
    )
    cmp = load_comparison(path, ["rounds=3"])
    assert cmp.name == "t" and list(cmp.variants) == ["A", "B"]
    a, b = cmp.variants["A"], cmp.variants["B"]
    assert (a.rounds, a.local.lr, a.local.epochs, a.algorithm.model_extra) == (3, 0.2, 2, {"mu": 0.5})
    assert b.model.options == {"hidden": [4]}  # options are replaced whole, not merged key by key
    assert b.algorithm.name == "fedavg" and b.local.lr == 0.1


@pytest.mark.parametrize(
    "text, message",
    [
        ("base: {}\nvariants:\n  A: {algorithm: {name: nosuch}}\n", "variants.A: algorithm.name: got 'nosuch'"),
        ("base: {}\nvariants: {}\n", "variants: empty"),
        ("base: {}\n", "needs 'base' and 'variants'"),
        ("base: {}\nvariants: {A: {}}\nextra: 1\n", "extra: unknown key in a comparison"),
    ],
)
def test_comparison_errors(tmp_path, text, message):
    path = tmp_path / "cmp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_comparison(path)


def test_summarize_and_headline_metric():
    history = [
        {"round": 1, "eval/global/accuracy": 0.5, "bytes_up": 10, "bytes_down": 20, "train_flops": 5.0, "failures": 1},
        {"round": 2, "eval/global/accuracy": 0.4, "bytes_up": 10, "bytes_down": 20, "train_flops": 5.0, "failures": 0},
    ]
    s = summarize("v", history, 1.5)
    assert s["metric"] == "eval/global/accuracy"
    assert (s["final_accuracy"], s["best_accuracy"]) == (0.4, 0.5)
    assert (s["bytes_total"], s["train_flops"], s["failures"], s["rounds"]) == (60, 10.0, 1, 2)
    assert headline_metric({"clients/accuracy_mean": 0.7}) == ("clients/accuracy_mean", 0.7)


def test_width_accuracy_table_and_plot(tmp_path):
    from fedhet.experiment.compare import width_accuracy
    from fedhet.experiment.report import markdown_width_table, width_columns, write_report

    row = {
        "eval/global/accuracy": 0.9,
        "eval/global/width": 1.0,
        "eval/width_0.25/accuracy": 0.5,
        "eval/width_0.25/width": 0.25,
        "eval/width_0.5/accuracy": 0.7,
        "eval/width_0.5/width": 0.5,
    }
    assert width_accuracy(row) == {"1": 0.9, "0.5": 0.7, "0.25": 0.5}
    rows = [
        {"variant": "HeteroFL", "width_accuracy": width_accuracy(row)},
        {"variant": "AllSmall", "width_accuracy": {"0.25": 0.4}},
    ]
    assert width_columns(rows) == ["1", "0.5", "0.25"]
    table = markdown_width_table(rows)
    assert "| HeteroFL | 90.00 | 70.00 | 50.00 |" in table and "| AllSmall | - | - | 40.00 |" in table
    # one width per variant: no width table
    assert width_columns([{"variant": "x", "width_accuracy": {"1": 0.5}}]) == []
    write_report(tmp_path, "t", rows, {})
    assert (tmp_path / "accuracy_per_width.png").exists()
    assert "width 0.25" in (tmp_path / "report.md").read_text()


def test_model_metrics_and_the_per_model_table():
    from fedhet.experiment.compare import model_metrics, summarize
    from fedhet.experiment.report import markdown_model_table

    row = {
        "round": 3,
        "metric": "f1",
        "eval/depth_6/loss": 0.3,
        "eval/depth_6/f1": 0.5,
        "eval/depth_6/f1/Drug": 0.75,
        "eval/depth_6/width": 1.0,
        "eval/depth_2/f1": 0.25,
        "eval/depth_2/width": 1.0,
        "clients/f1_mean": 0.4,
        "clients/tier_a/f1_mean": 0.45,
        "clients/tier_a/f1/Drug_mean": 0.6,
    }
    assert model_metrics(row) == {
        "depth_6": {"f1": 0.5, "f1/Drug": 0.75},
        "depth_2": {"f1": 0.25},
        "clients, tier a": {"f1": 0.45, "f1/Drug": 0.6},
    }
    s = summarize("InclusiveFL", [row], 1.0)
    assert (s["metric"], s["metric_name"], s["final_accuracy"]) == ("eval/depth_6/f1", "f1", 0.5)
    assert s["final_metrics"] == {"f1": 0.5, "f1/Drug": 0.75}
    table = markdown_model_table([s]).splitlines()
    assert table[0] == "| variant | model | f1 | f1/Drug |"
    assert table[2] == "| InclusiveFL | depth_6 | 50.00 | 75.00 |"
    assert table[4] == "| InclusiveFL | clients, tier a | 45.00 | 60.00 |"
    assert markdown_model_table([{"variant": "x", "model_metrics": {"global": {"accuracy": 0.5}}}]) == ""
    # several targets at one width: the first listed (the headline) stands for it
    from fedhet.experiment.compare import width_accuracy

    assert width_accuracy(row) == {"1": 0.5}


def test_variant_folders_are_one_shell_friendly_name():
    from fedhet.experiment.compare import run_dir_name

    assert run_dir_name("InclusiveFL w/o MD") == "InclusiveFL_w_o_MD"
    assert run_dir_name("FjORD (KD)") == "FjORD_KD"
    assert run_dir_name("FedAvg+FT") == "FedAvg+FT"
    assert run_dir_name("a\\b") == "a_b"
    assert run_dir_name("..") == "variant"


def test_variants_whose_folders_would_clash_are_refused(tmp_path):
    from fedhet.experiment.compare import load_comparison
    from fedhet.experiment.config import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("name: c\nbase: {rounds: 1}\nvariants:\n  'a b': {}\n  'a/b': {}\n")
    with pytest.raises(ConfigError, match="variants 'a b' and 'a/b' would share the run folder 'a_b'; allowed: names"):
        load_comparison(path)


def test_mean_squared_error_is_not_shown_as_a_percentage():
    from fedhet.experiment.report import markdown_metric_table

    rows = [{"variant": "v", "final_metrics": {"pearson": 0.5, "mse": 2.25}}]
    assert markdown_metric_table(rows).splitlines()[2] == "| v | 2.250 | 50.00 |"
