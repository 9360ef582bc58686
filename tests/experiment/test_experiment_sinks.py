"""Logging sinks (fedhet.experiment.sinks): TensorBoard event files read back with TensorBoard's own
event reader, MLflow runs read back through MlflowClient, resumes without duplicate steps, comparisons
grouped, and the errors of a sink that is missing, unknown or failing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fedhet.experiment.build import build_run
from fedhet.experiment.config import ConfigError, dump_config, load_config
from fedhet.experiment.logging import CLIENTS, METRICS, RunLog, read_jsonl, write_run_header
from fedhet.experiment.sinks import RECORD, SINKS, flatten, mlflow_key
from fedhet.simulation.loop import run_rounds

pytest.importorskip("tensorboard", reason='the tensorboard sink needs tensorboard: pip install "fedhet[tensorboard]"')
pytest.importorskip("mlflow", reason='the mlflow sink needs mlflow: pip install "fedhet[mlflow]"')

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# two tiers (per-tier histograms), clients evaluated every other round
TINY = [
    "data.dataset=synthetic",
    "data.num_clients=4",
    "model.options={hidden: [4]}",
    "local.max_steps=1",
    "logging.progress=off",
    "devices.tiers=a1-b1",
    "algorithm.name=heterofl",
    "eval.every=2",
    "runtime.threads=1",
]

pytestmark = pytest.mark.usefixtures("keep_threads")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (creating a sqlite store's tables takes seconds)."""
    path = tmp_path_factory.mktemp("mlruns") / "mlflow.db"
    return f"sqlite:///{path}"


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def events(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def run(tmp_path, name, *extra, resume=False, stop_at=None):
    cfg = load_config(None, [*TINY, *extra])
    r = build_run(cfg, tmp_path / name)
    write_run_header(tmp_path / name, dump_config(cfg), r.world.dataset)  # as fedhet run does
    if stop_at is not None:

        def stop(rnd, row):
            if rnd == stop_at:
                raise KeyboardInterrupt

        r.on_round = stop
        with pytest.raises(KeyboardInterrupt):
            run_rounds(r, resume=resume)
        return r
    run_rounds(r, resume=resume)
    return r


# ------------------------------------------------------------------------------ config


def test_sinks_are_checked_with_the_config():
    assert load_config(None, ["logging.sinks=tensorboard,mlflow"]).logging.sinks == ["tensorboard", "mlflow"]
    assert load_config(None, []).logging.sinks == []
    with pytest.raises(ConfigError, match=r"^logging.sinks: got 'wandb', allowed: a list of mlflow, tensorboard$"):
        load_config(None, ["logging.sinks=[tensorboard, wandb]"])
    with pytest.raises(ConfigError, match="^logging.sinks: got .*, allowed: each sink once$"):
        load_config(None, ["logging.sinks=[mlflow, mlflow]"])


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_a_sink_whose_package_is_missing_names_the_extra(monkeypatch, tmp_path, capsys, name):
    from fedhet.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    message = f'logging.sinks: {name} needs the {name} package: pip install "fedhet[{name}]"'
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"logging.sinks=[{name}]"])
    assert str(err.value) == message
    # the command line says it in one line, before anything is written
    assert main(["run", *TINY, "rounds=1", f"logging.sinks=[{name}]", "--run-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == f"fedhet: config error: {message}"
    assert not (tmp_path / "r").exists()


def test_the_catalog_documents_the_new_fields():
    from fedhet.experiment.catalog import find, format_entry

    text = "\n".join(format_entry(e) for e in find("logging"))
    assert "sinks" in text and "mlflow_uri" in text


# ------------------------------------------------------------------------------ MLflow names


def test_mlflow_keys_keep_allowed_characters_only():
    assert mlflow_key("eval/width_0.5/accuracy") == "eval/width_0.5/accuracy"
    assert mlflow_key("clients/tier_ä:b/accuracy_mean") == "clients/tier___b/accuracy_mean"
    assert mlflow_key("/a//b/../c/./d/") == "a/b/c/d"
    assert mlflow_key("x" * 300) == "x" * 250
    assert mlflow_key("..") == "_"
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name

    for key in ("clients/tier_ä:b/x", "/a//b/../c/", "a\\b?c*", "tier <1>", "..", "x" * 300):
        _validate_metric_name(mlflow_key(key))
        _validate_param_name(mlflow_key(key))


def test_config_flattens_to_dotted_text_params():
    flat = flatten({"a": {"b": 1, "c": [1, 2], "d": {}, "e": None, "f": True}, "g": "x", "h": 0.5})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "a.d": "{}", "a.e": "null", "a.f": "true", "g": "x", "h": "0.5"}


# ------------------------------------------------------------------------------ TensorBoard


def test_tensorboard_holds_every_metric_width_histograms_and_the_config(tmp_path):
    run(tmp_path, "r", "rounds=4", "logging.sinks=[tensorboard]")
    rows = read_jsonl(tmp_path / "r" / METRICS)
    acc = events(tmp_path / "r" / "tensorboard")
    tags = acc.Tags()
    numeric = {
        k
        for r in rows
        for k, v in r.items()
        if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    assert numeric <= set(tags["scalars"])
    for key in numeric:
        steps = [r["round"] for r in rows if isinstance(r.get(key), (int, float))]
        assert [e.step for e in acc.Scalars(key)] == steps, key
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2, 3, 4]
    # the headline metric per model width, and the clients' tier means, in evaluation rounds
    assert {"width/1/accuracy", "width/0.5/accuracy"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("width/0.5/accuracy")] == [2, 4]
    assert [e.step for e in acc.Scalars("clients/tier_b/accuracy_mean")] == [2, 4]
    last = rows[-1]
    assert acc.Scalars("eval/global/accuracy")[-1].value == pytest.approx(last["eval/global/accuracy"])
    # histograms of the clients' own-split accuracy, all and per tier, where clients were evaluated
    assert {"clients/accuracy", "clients/tier_a/accuracy", "clients/tier_b/accuracy"} <= set(tags["histograms"])
    hist = acc.Histograms("clients/accuracy")
    assert [h.step for h in hist] == [2, 4] and hist[-1].histogram_value.num == 4
    clients = [c for c in read_jsonl(tmp_path / "r" / CLIENTS) if c["round"] == 4 and "eval_accuracy" in c]
    assert hist[-1].histogram_value.sum == pytest.approx(sum(c["eval_accuracy"] for c in clients))
    # the resolved config as text at step 0
    (text,) = acc.Tensors("config/text_summary")
    assert text.step == 0
    shown = text.tensor_proto.string_val[0].decode()
    assert "    rounds: 4" in shown and "sinks:" in shown and "- tensorboard" in shown
    record = json.loads((tmp_path / "r" / RECORD).read_text())
    assert record == {"tensorboard": {"logdir": "tensorboard", "through": 4}}


# ------------------------------------------------------------------------------ MLflow


def test_mlflow_run_has_the_params_metrics_and_artifacts(tmp_path, store):
    run(tmp_path, "r", "rounds=3", "name=mlflow-check", "logging.sinks=[mlflow]", f"logging.mlflow_uri={store}")
    record = json.loads((tmp_path / "r" / RECORD).read_text())["mlflow"]
    assert record["tracking_uri"] == store and record["through"] == 3
    c = client(store)
    got = c.get_run(record["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "r"
    assert c.get_experiment(got.info.experiment_id).name == "mlflow-check"
    # params: the resolved config, dotted
    cfg = load_config(tmp_path / "r" / "config.yaml")
    want = {mlflow_key(k): v for k, v in flatten(cfg.model_dump(mode="json")).items()}
    assert got.data.params == want
    assert got.data.params["rounds"] == "3" and got.data.params["devices.tiers"] == "a1-b1"
    assert got.data.params["model.options.hidden"] == "[4]"
    # metrics: every number of every row, at step = round
    rows = read_jsonl(tmp_path / "r" / METRICS)
    keys = {
        k
        for r in rows
        for k, v in r.items()
        if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    assert set(got.data.metrics) == keys
    for key in ("train_loss", "eval/global/accuracy", "clients/tier_a/accuracy_mean", "bytes_up"):
        history = sorted((m.step, m.value) for m in c.get_metric_history(record["run_id"], key))
        assert history == [(r["round"], pytest.approx(float(r[key]))) for r in rows if r.get(key) is not None], key
    # artifacts: the run folder's records, not its checkpoints or client rows
    names = {a.path for a in c.list_artifacts(record["run_id"])}
    assert {"config.yaml", "dataset.json", "metrics.csv", "metrics.jsonl"} <= names
    assert not names & {"checkpoint.pt", "clients.jsonl", "sinks.json"}


def test_a_resumed_run_continues_both_sinks_without_duplicate_steps(tmp_path, store):
    sinks = [
        "logging.sinks=[tensorboard, mlflow]",
        f"logging.mlflow_uri={store}",
        "rounds=5",
        "runtime.checkpoint_every=2",
    ]
    # stopped after round 3, whose checkpoint was not written: rounds 3.. are redone
    run(tmp_path, "r", *sinks, stop_at=3)
    record = json.loads((tmp_path / "r" / RECORD).read_text())
    assert record["tensorboard"]["through"] == 3 and record["mlflow"]["through"] == 2
    run_id = record["mlflow"]["run_id"]
    c = client(store)
    assert c.get_run(run_id).info.status == "KILLED"
    assert sorted(m.step for m in c.get_metric_history(run_id, "train_loss")) == [1, 2]
    run(tmp_path, "r", *sinks, resume=True)
    rows = read_jsonl(tmp_path / "r" / METRICS)
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    # the same MLflow run, each step once, with the values of the run folder's rows
    assert json.loads((tmp_path / "r" / RECORD).read_text())["mlflow"]["run_id"] == run_id
    assert c.get_run(run_id).info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "train_loss"))
    assert history == [(r["round"], pytest.approx(r["train_loss"])) for r in rows]
    # TensorBoard: the redone round 3 replaces the first one (purge_step), every step once
    acc = events(tmp_path / "r" / "tensorboard")
    assert len(list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert [(e.step, e.value) for e in acc.Scalars("train_loss")] == [
        (r["round"], pytest.approx(r["train_loss"])) for r in rows
    ]
    assert [h.step for h in acc.Histograms("clients/accuracy")] == [2, 4, 5]
    assert [t.step for t in acc.Tensors("config/text_summary")] == [0]


def test_a_sink_added_on_resume_gets_the_earlier_rounds(tmp_path, store):
    run(tmp_path, "r", "rounds=4", stop_at=3)  # no sinks; checkpoint after every round
    run(tmp_path, "r", "rounds=4", "logging.sinks=[mlflow, tensorboard]", f"logging.mlflow_uri={store}", resume=True)
    rows = read_jsonl(tmp_path / "r" / METRICS)
    run_id = json.loads((tmp_path / "r" / RECORD).read_text())["mlflow"]["run_id"]
    history = sorted((m.step, m.value) for m in client(store).get_metric_history(run_id, "train_loss"))
    assert history == [(r["round"], pytest.approx(r["train_loss"])) for r in rows]
    acc = events(tmp_path / "r" / "tensorboard")
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2, 3, 4]
    assert [h.step for h in acc.Histograms("clients/accuracy")] == [2, 4]


def test_an_unreachable_store_fails_before_the_first_round(tmp_path):
    with pytest.raises(ConfigError, match=r"^logging.sinks: mlflow could not start a run in nosuch://store: "):
        run(tmp_path, "r", "rounds=2", "logging.sinks=[mlflow]", "logging.mlflow_uri=nosuch://store")
    assert read_jsonl(tmp_path / "r" / METRICS) == []


class Broken:
    """A sink that fails in its second round."""

    calls: list = []

    def __init__(self, context):
        pass

    def start(self, run_dir, resume_round):
        Broken.calls.append("start")

    def log_round(self, row, clients, evaluated):
        Broken.calls.append(row["round"])
        if row["round"] == 2:
            raise OSError("disk full")

    def checkpoint(self, rnd):
        pass

    def close(self, status):
        Broken.calls.append(status)


def test_a_failing_sink_is_turned_off_and_the_run_goes_on(tmp_path, capsys):
    SINKS.register("broken")(Broken)
    try:
        Broken.calls = []
        run(tmp_path, "r", "rounds=3", "logging.sinks=[broken]")
    finally:
        SINKS.unregister("broken")
    assert Broken.calls == ["start", 1, 2, "failed"]
    err = capsys.readouterr().err
    assert "warning: logging sink broken failed (OSError: disk full); it is off for the rest of this run" in err
    assert [r["round"] for r in read_jsonl(tmp_path / "r" / METRICS)] == [1, 2, 3]


def test_the_run_log_is_a_sink_too(tmp_path):
    """RunLog takes the sink calls: log_round with the evaluated flag, checkpoint and close."""
    log = RunLog(tmp_path)
    log.log_round({"round": 1, "loss": 0.5}, [], evaluated=False)
    log.checkpoint(1)
    log.close("finished")
    assert read_jsonl(tmp_path / METRICS) == [{"round": 1, "loss": 0.5}]


# ------------------------------------------------------------------------------ comparisons


def test_a_comparison_groups_its_variants(tmp_path, store):
    from fedhet.experiment.compare import load_comparison, run_comparison

    path = tmp_path / "cmp.yaml"
    path.write_text(
        "name: grouped\n"
        "base: {rounds: 2, data: {dataset: synthetic, num_clients: 4}, model: {options: {hidden: [4]}},\n"
        "       local: {max_steps: 1}, runtime: {threads: 1},\n"
        f"       logging: {{progress: 'off', sinks: [tensorboard, mlflow], mlflow_uri: '{store}'}}}}\n"
        "variants:\n"
        "  FedAvg: {}\n"
        "  'FedProx (mu 0.1)': {algorithm: {name: fedprox, mu: 0.1}}\n"
    )
    out = tmp_path / "out"
    for overwrite in (False, True):  # run twice: --overwrite replaces each variant's MLflow run
        run_comparison(load_comparison(path), out, overwrite=overwrite)
    # TensorBoard: one folder, a sub-folder a variant (named as the variant's folder)
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["FedAvg", "FedProx_mu_0.1"]
    for name in ("FedAvg", "FedProx_mu_0.1"):
        logdir = out / "tensorboard" / name
        assert len(list(logdir.glob("events.out.tfevents.*"))) == 1  # the first run's events were removed
        assert [e.step for e in events(logdir).Scalars("train_loss")] == [1, 2]
        assert json.loads((out / name / RECORD).read_text())["tensorboard"]["logdir"] == f"../tensorboard/{name}"
    # MLflow: one experiment named after the comparison; a parent run with the report, a child a variant
    c = client(store)
    experiment = c.get_experiment_by_name("grouped")
    runs = c.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.run_name for p in parents] == ["grouped"]
    assert sorted(r.info.run_name for r in children) == ["FedAvg", "FedProx (mu 0.1)"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in runs)
    artifacts = {a.path for a in c.list_artifacts(parents[0].info.run_id)}
    assert {"report.md", "report.html", "accuracy.png", "summary.json"} <= artifacts
