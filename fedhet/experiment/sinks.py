"""Logging sinks: where else a run's rounds go besides its run folder (TensorBoard, MLflow).

A sink has four calls, made by the run's :class:`~fedhet.experiment.logging.RunLog` (which is the
run folder's own sink: ``metrics.jsonl``, ``metrics.csv``, ``clients.jsonl``):

``start(run_dir, resume_round)``
    before the first round (``resume_round``: the checkpoint's round when resuming, else None);
``log_round(row, clients, evaluated)``
    after each round: its metrics row, its per-client rows, and whether it evaluated the clients
    (then the client rows hold each client's ``eval_<metric>``);
``checkpoint(rnd)``
    after the checkpoint of round ``rnd`` is written: the rounds up to it are what a resume keeps;
``close(status)``
    at the end: ``finished``, ``stopped`` (interrupted) or ``failed``.

A sink may also have ``view(run_dir, resume) -> str``: the line ``fedhet run`` prints at the start
(where the sink's data go and the command that shows them).

Sinks are chosen by name in ``logging.sinks`` and registered in :data:`SINKS`. Each records what it
needs to continue a resumed run in the run folder's ``sinks.json`` (the TensorBoard folder, the
MLflow run id) and the last round it delivered, so a resumed run continues the same curves without
logging a step twice: TensorBoard purges the steps after the checkpoint (``purge_step``), MLflow is
only sent rounds whose checkpoint is written, and rounds a sink never got (a sink added on resume)
are sent from the run folder's records first.

A comparison (``fedhet compare``) groups its variants: one TensorBoard folder ``OUT/tensorboard``
with a sub-folder a variant, and one MLflow experiment named after the comparison, in which a
parent run holds the comparison's report and each variant is a child run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedhet.core.registry import Registry
from fedhet.experiment.checkpoint import atomic_write_bytes

#: what each sink needs to continue a resumed run, in the run folder
RECORD = "sinks.json"
#: the run folder's files an MLflow run gets as artifacts (those present); never checkpoints or clients.jsonl
RUN_ARTIFACTS = ("config.yaml", "dataset.json", "devices.json", "metrics.csv", "metrics.jsonl", "commands.txt")
#: a report folder's files an MLflow run gets as artifacts (those present), besides its plots (*.png)
REPORT_ARTIFACTS = ("report.md", "report.html", "summary.json", "commands.txt")


class Sink(Protocol):
    """Where a run's rounds go, besides the run folder (see the module's docstring)."""

    def start(self, run_dir: Path, resume_round: int | None) -> None: ...

    def log_round(self, row: dict[str, Any], clients: list[dict[str, Any]], evaluated: bool) -> None: ...

    def checkpoint(self, rnd: int) -> None: ...

    def close(self, status: str) -> None: ...


@dataclass
class SinkContext:
    """What a sink knows of its run beyond the run folder: the resolved config, and for a
    comparison's variant, the comparison it belongs to."""

    #: the resolved config (``ExperimentConfig.model_dump(mode="json")``)
    config: dict[str, Any]
    #: the run's name (a variant's name in a comparison)
    name: str
    #: the comparison's name and folder (None: a run of its own)
    group: str | None = None
    group_dir: Path | None = None
    #: the comparison's MLflow parent run per tracking URI (filled by :class:`Group`)
    parents: dict[str, str] = field(default_factory=dict)


#: name -> sink class; a class has ``module`` (the package it imports) and ``extra`` (fedhet's extra
#: that installs it), and is built as ``cls(context)``
SINKS: Registry[Any] = Registry("logging sink")


def missing_package(name: str) -> str | None:
    """The one-line error for sink ``name`` when its package is not installed, else None."""
    cls = SINKS.get(name)
    module = getattr(cls, "module", None)
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    extra = getattr(cls, "extra", module)
    return f'logging.sinks: {name} needs the {module} package: pip install "fedhet[{extra}]"'


def make_sinks(cfg: Any, context: SinkContext | None = None) -> list[Sink]:
    """The sinks ``cfg.logging.sinks`` names (nothing is imported or written until ``start``)."""
    names = list(cfg.logging.sinks)
    if not names:
        return []
    if context is None:
        context = SinkContext(config=cfg.model_dump(mode="json"), name=cfg.name)
    return [SINKS.get(name)(context) for name in names]


# ------------------------------------------------------------------------------ the record


def read_record(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_record(run_dir: Path, name: str, entry: dict[str, Any] | None) -> None:
    """Set (or with None, remove) sink ``name``'s entry in the run folder's record."""
    data = read_record(run_dir)
    if entry is None:
        if name not in data:
            return
        data.pop(name)
    else:
        data[name] = entry
    if not data:
        (Path(run_dir) / RECORD).unlink(missing_ok=True)
        return
    atomic_write_bytes(Path(run_dir) / RECORD, (json.dumps(data, indent=1) + "\n").encode())


def prune_record(run_dir: Path, keep: list[str]) -> None:
    """Drop the entries of sinks not in ``keep`` (a fresh run without them)."""
    for name in list(read_record(run_dir)):
        if name not in keep:
            write_record(run_dir, name, None)


def _history(run_dir: Path, after: int, through: int) -> list[tuple[dict[str, Any], list[dict[str, Any]], bool]]:
    """The run folder's rounds ``after < round <= through``: (row, client rows, clients evaluated)."""
    from fedhet.experiment.logging import CLIENTS, METRICS, read_jsonl

    if through <= after:
        return []
    rows = [r for r in read_jsonl(Path(run_dir) / METRICS) if after < r.get("round", 0) <= through]
    if not rows:
        return []
    clients: dict[int, list[dict[str, Any]]] = {}
    for c in read_jsonl(Path(run_dir) / CLIENTS):
        if after < c.get("round", 0) <= through:
            clients.setdefault(c["round"], []).append(c)
    out = []
    for row in rows:
        crows = clients.get(row["round"], [])
        metric = row.get("metric")
        out.append((row, crows, bool(metric) and any(f"eval_{metric}" in c for c in crows)))
    return out


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers (no ``round``, no booleans, no text)."""
    out = {}
    for k, v in row.items():
        if k == "round" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


def client_values(clients: list[dict[str, Any]], metric: str) -> dict[str, list[float]]:
    """Each client's ``eval_<metric>``: all clients (key ``""``) and per tier (key = the tier)."""
    out: dict[str, list[float]] = {}
    for c in clients:
        v = c.get(f"eval_{metric}")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.setdefault("", []).append(float(v))
            out.setdefault(str(c.get("tier")), []).append(float(v))
    return out


def _quiet(*loggers: str) -> None:
    import logging

    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)


# ------------------------------------------------------------------------------ TensorBoard


def tensorboard_dir(run_dir: Path, context: SinkContext, resume: bool = False) -> Path:
    """Where a run's event files go: ``RUN_DIR/tensorboard``; a comparison's variant:
    ``OUT/tensorboard/<variant folder>`` (so that ``tensorboard --logdir OUT/tensorboard`` shows the
    variants side by side, named as their folders). A resumed run keeps its recorded folder."""
    recorded = read_record(run_dir).get("tensorboard", {}).get("logdir") if resume else None
    if recorded:
        return Path(run_dir) / recorded
    if context.group_dir is not None:
        return Path(context.group_dir) / "tensorboard" / Path(run_dir).name
    return Path(run_dir) / "tensorboard"


def _config_text(config: dict[str, Any]) -> str:
    import yaml

    text = yaml.safe_dump(config, sort_keys=False)
    # indented four spaces: TensorBoard's text plugin renders Markdown, this shows as code
    return "\n".join("    " + line for line in text.splitlines())


@SINKS.register("tensorboard")
class TensorBoardSink:
    """TensorBoard event files: a scalar for every number of a round's row (its slashes group the
    tags: ``eval/<target>/<metric>``, ``clients/tier_<t>/<metric>_mean``, ...), the headline metric
    per model width (``width/<w>/<metric>``), histograms of the clients' own-split metric in rounds
    that evaluated them (``clients/<metric>``, and ``clients/tier_<t>/<metric>`` with several tiers),
    and the resolved config as text at step 0. Written through PyTorch's ``SummaryWriter``, flushed
    every round (a live view)."""

    module = "tensorboard"
    extra = "tensorboard"

    def __init__(self, context: SinkContext) -> None:
        self.context = context
        self.writer: Any = None
        self.run_dir: Path | None = None
        self.logdir: Path | None = None

    def view(self, run_dir: Path, resume: bool = False) -> str:
        """The live-view line: where the events go and the command that shows them."""
        return view_line(tensorboard_dir(run_dir, self.context, resume))

    def start(self, run_dir: Path, resume_round: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        old = read_record(run_dir).get("tensorboard")
        self.logdir = tensorboard_dir(run_dir, self.context, resume=resume_round is not None)
        self.logdir.mkdir(parents=True, exist_ok=True)
        through = 0
        if resume_round is None:
            # an earlier run's events in this folder (--overwrite) would mix with this run's
            for path in self.logdir.glob("events.out.tfevents.*"):
                path.unlink(missing_ok=True)
            if old and old.get("logdir"):
                for path in (Path(run_dir) / old["logdir"]).glob("events.out.tfevents.*"):
                    path.unlink(missing_ok=True)
            self.writer = SummaryWriter(str(self.logdir))
            self.writer.add_text("config", _config_text(self.context.config), 0)
        else:
            through = min(int((old or {}).get("through", 0)), resume_round)
            # events of the rounds after the checkpoint (redone now) are hidden from this step on
            self.writer = SummaryWriter(str(self.logdir), purge_step=resume_round + 1)
            if not old:
                self.writer.add_text("config", _config_text(self.context.config), 0)
        self._record(through)
        for row, clients, evaluated in _history(run_dir, through, resume_round or 0):
            self.log_round(row, clients, evaluated)

    def _record(self, through: int) -> None:
        assert self.run_dir is not None and self.logdir is not None
        rel = os.path.relpath(self.logdir, self.run_dir)
        write_record(self.run_dir, "tensorboard", {"logdir": rel, "through": through})

    def log_round(self, row: dict[str, Any], clients: list[dict[str, Any]], evaluated: bool) -> None:
        from fedhet.experiment.compare import width_accuracy

        step = int(row["round"])
        w = self.writer
        for k, v in numeric(row).items():
            w.add_scalar(k, v, step)
        metric = row.get("metric") or "accuracy"
        widths = width_accuracy(row)
        for width, v in widths.items():
            if v is not None and math.isfinite(v):
                w.add_scalar(f"width/{width}/{metric}", float(v), step)
        if evaluated:
            import numpy as np

            values = client_values(clients, metric)
            if values.get(""):
                w.add_histogram(f"clients/{metric}", np.asarray(values[""]), step)
            tiers = [t for t in values if t]
            if len(tiers) > 1:
                for t in sorted(tiers):
                    w.add_histogram(f"clients/tier_{t}/{metric}", np.asarray(values[t]), step)
        w.flush()
        self._record(step)

    def checkpoint(self, rnd: int) -> None:
        pass

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def view_line(logdir: Path) -> str:
    """The live-view line: where the event files go and the command that shows them."""
    return f"TensorBoard: logs in {logdir}; view them with: tensorboard --logdir {shlex.quote(str(logdir))}"


# ------------------------------------------------------------------------------ MLflow

#: characters MLflow allows in metric and param names (others become "_")
_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def mlflow_key(key: str) -> str:
    """``key`` as an MLflow metric or param name: characters other than letters, digits and
    ``_ - . space /`` become ``_``; empty, ``.`` and ``..`` path segments and leading or trailing
    slashes are dropped (MLflow refuses them); at most 250 characters."""
    key = _MLFLOW_BAD.sub("_", key)
    parts = [p for p in key.split("/") if p.strip() not in ("", ".", "..")]
    out = "/".join(p.strip() for p in parts) or "_"
    return out[:250]


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """A nested mapping as dotted keys with text values (lists and empty mappings as JSON)."""
    out: dict[str, str] = {}
    if isinstance(config, dict) and config:
        for k, v in config.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(config, str):
        text = config
    elif config is None:
        text = "null"
    elif isinstance(config, bool):
        text = "true" if config else "false"
    elif isinstance(config, (int, float)):
        text = repr(config)
    else:
        text = json.dumps(config, default=str)
    out[prefix or "config"] = text
    return out


def default_mlflow_uri(config: dict[str, Any]) -> str:
    """``sqlite:///<logging.dir>/mlruns/mlflow.db`` (an absolute path)."""
    root = Path((config.get("logging") or {}).get("dir") or "runs").expanduser().resolve() / "mlruns"
    return f"sqlite:///{root / 'mlflow.db'}"


def _limits() -> tuple[int, int, int]:
    """MLflow's most params (and tags) in a batch, metrics in a batch, and characters of a value."""
    try:
        from mlflow.utils import validation as v

        return v.MAX_PARAMS_TAGS_PER_BATCH, v.MAX_METRICS_PER_BATCH, v.MAX_PARAM_VAL_LENGTH
    except (ImportError, AttributeError):
        return 100, 1000, 500


def _open_store(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri`` (a local sqlite store's folder is created first)."""
    _quiet("alembic", "alembic.runtime.migration", "mlflow.store.db.utils")
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def _experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name`` (created, or restored when deleted)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            # a local store keeps its artifacts beside its database
            location = (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
        return client.create_experiment(name, artifact_location=location)
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _log_files(client: Any, run_id: str, folder: Path, names: tuple[str, ...], plots: bool) -> None:
    for name in names:
        path = folder / name
        if path.is_file():
            client.log_artifact(run_id, str(path))
    if plots:
        for path in sorted(folder.glob("*.png")):
            client.log_artifact(run_id, str(path))


@SINKS.register("mlflow")
class MLflowSink:
    """An MLflow run: the resolved config as params (dotted keys), every number of a round's row as
    a metric at step = round (sent in batches once the round's checkpoint is written, so a resumed
    run never logs a step twice), and at the end the run folder's config, dataset record, metrics
    and any report and plots as artifacts. Tracking store: ``logging.mlflow_uri``, by default a
    local ``sqlite:///<logging.dir>/mlruns/mlflow.db`` with its artifacts in ``mlruns/artifacts``.
    The experiment is the run's name (a comparison's: the comparison's name). The run's id is
    kept in ``sinks.json``: a resume continues the same MLflow run."""

    module = "mlflow"
    extra = "mlflow"

    def __init__(self, context: SinkContext) -> None:
        self.context = context
        self.client: Any = None
        self.run_id: str | None = None
        self.run_dir: Path | None = None
        self.pending: list[dict[str, Any]] = []
        self.through = 0
        self.uri = ""

    def _uri(self, run_dir: Path | None, resume: bool) -> str:
        given = (self.context.config.get("logging") or {}).get("mlflow_uri")
        if given:
            return given
        if resume and run_dir is not None:
            recorded = read_record(run_dir).get("mlflow", {}).get("tracking_uri")
            if recorded:
                return recorded
        return default_mlflow_uri(self.context.config)

    def view(self, run_dir: Path, resume: bool = False) -> str:
        """The line that says where the run goes and the command that shows it."""
        return mlflow_view_line(self._uri(run_dir, resume))

    def start(self, run_dir: Path, resume_round: int | None) -> None:
        self.run_dir = Path(run_dir)
        self.uri = self._uri(self.run_dir, resume_round is not None)
        try:
            self.client = _open_store(self.uri)
            old = read_record(run_dir).get("mlflow") or {}
            same_store = old.get("tracking_uri") == self.uri
            if resume_round is not None and same_store and old.get("run_id"):
                self.run_id = old["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                self.through = min(int(old.get("through", 0)), resume_round)
                self._params(resume=True)
            else:
                if resume_round is None and same_store and old.get("run_id"):
                    # a fresh run replaces the earlier run of this folder (--overwrite): that one is deleted
                    with contextlib.suppress(Exception):
                        self.client.delete_run(old["run_id"])
                self._create()
        except Exception as err:  # noqa: BLE001 - any failure to reach the store: one line, before training
            from fedhet.experiment.config import ConfigError

            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"logging.sinks: mlflow could not start a run in {self.uri}: {first}") from err
        self._record()
        history = _history(self.run_dir, self.through, resume_round or 0)
        if history:
            self.pending = [h[0] for h in history]
            self._flush(history[-1][0]["round"])

    def _create(self) -> None:
        ctx = self.context
        experiment = _experiment(self.client, ctx.group or ctx.name, self.uri)
        tags = {
            "fedhet.run_dir": str(Path(self.run_dir).resolve()),
            "fedhet.algorithm": str(ctx.config.get("algorithm", {}).get("name")),
        }
        parent = ctx.parents.get(self.uri)
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        name = ctx.name if ctx.group else Path(self.run_dir).name
        run = self.client.create_run(experiment, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        self.through = 0
        self._params(resume=False)

    def _params(self, resume: bool) -> None:
        from mlflow.entities import Param

        per_batch, _, length = _limits()
        params = {mlflow_key(k): v[:length] for k, v in flatten(self.context.config).items()}
        if resume:
            # params cannot change: a resume (which may change runtime, logging or rounds) adds new keys only
            have = self.client.get_run(self.run_id).data.params
            params = {k: v for k, v in params.items() if k not in have}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), per_batch):
            self.client.log_batch(self.run_id, params=items[i : i + per_batch])

    def _record(self) -> None:
        assert self.run_dir is not None
        write_record(self.run_dir, "mlflow", {"tracking_uri": self.uri, "run_id": self.run_id, "through": self.through})

    def log_round(self, row: dict[str, Any], clients: list[dict[str, Any]], evaluated: bool) -> None:
        self.pending.append(row)

    def checkpoint(self, rnd: int) -> None:
        self._flush(rnd)

    def _flush(self, rnd: int) -> None:
        from mlflow.entities import Metric

        rows = [r for r in self.pending if self.through < r["round"] <= rnd]
        self.pending = [r for r in self.pending if r["round"] > rnd]
        if not rows:
            return
        _, per_batch, _ = _limits()
        now = int(time.time() * 1000)
        # keys that read the same once made MLflow's (a tier's odd name): the last value stands
        unique = {(mlflow_key(k), int(r["round"])): v for r in rows for k, v in numeric(r).items()}
        metrics = [Metric(k, v, now, step) for (k, step), v in unique.items()]
        for i in range(0, len(metrics), per_batch):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + per_batch])
        self.through = max(self.through, max(r["round"] for r in rows))
        self._record()

    def close(self, status: str) -> None:
        if self.client is None or self.run_id is None:
            return
        if status == "finished" and self.run_dir is not None:
            _log_files(self.client, self.run_id, self.run_dir, RUN_ARTIFACTS + ("report.md", "report.html"), plots=True)
        state = {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=state)
        self.client = None


def mlflow_view_line(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f"MLflow: runs in {uri}; view them with: mlflow ui --backend-store-uri {shlex.quote(uri)}"
    return f"MLflow: runs in {uri}"


# ------------------------------------------------------------------------------ comparisons


class Group:
    """A comparison's sinks: one TensorBoard folder (``OUT/tensorboard``, a sub-folder a variant),
    and per MLflow store one experiment named after the comparison with a parent run that holds the
    comparison's report; each variant's run is its child. The parent run's id is kept in
    ``OUT/sinks.json`` (a later ``--only`` run of some variants adds them to the same parent)."""

    def __init__(self, name: str, out_dir: Path, configs: dict[str, Any]) -> None:
        self.name = name
        self.out_dir = Path(out_dir)
        self.configs = configs
        self.parents: dict[str, str] = {}
        self._clients: dict[str, Any] = {}

    def context(self, cfg: Any, variant: str) -> SinkContext:
        return SinkContext(
            config=cfg.model_dump(mode="json"),
            name=variant,
            group=self.name,
            group_dir=self.out_dir,
            parents=self.parents,
        )

    def view_lines(self) -> list[str]:
        """The live-view lines of the comparison's sinks (TensorBoard's folder, MLflow's store)."""
        lines: list[str] = []
        if any("tensorboard" in cfg.logging.sinks for cfg in self.configs.values()):
            lines.append(view_line(self.out_dir / "tensorboard"))
        for uri in self._mlflow_uris():
            lines.append(mlflow_view_line(uri))
        return lines

    def _mlflow_uris(self) -> list[str]:
        uris: dict[str, None] = {}
        for cfg in self.configs.values():
            if "mlflow" in cfg.logging.sinks:
                config = cfg.model_dump(mode="json")
                uris[config["logging"].get("mlflow_uri") or default_mlflow_uri(config)] = None
        return list(uris)

    def start(self) -> None:
        """Open (or reopen) the parent run in each MLflow store the variants log to."""
        uris = self._mlflow_uris()
        if not uris:
            return
        recorded = read_record(self.out_dir).get("mlflow_parents") or {}
        try:
            for uri in uris:
                client = _open_store(uri)
                run_id = recorded.get(uri)
                run = None
                if run_id:
                    with contextlib.suppress(Exception):
                        run = client.get_run(run_id)
                if run is None or run.info.lifecycle_stage == "deleted":
                    experiment = _experiment(client, self.name, uri)
                    run = client.create_run(
                        experiment, run_name=self.name, tags={"fedhet.comparison": str(self.out_dir)}
                    )
                else:
                    client.update_run(run.info.run_id, status="RUNNING")
                self.parents[uri] = run.info.run_id
                self._clients[uri] = client
        except Exception as err:  # noqa: BLE001
            from fedhet.experiment.config import ConfigError

            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"logging.sinks: mlflow could not start the comparison's run: {first}") from err
        write_record(self.out_dir, "mlflow_parents", dict(self.parents))

    def finish(self, status: str = "finished") -> None:
        """Give each parent run the comparison's report, plots and summary; end it."""
        for uri, run_id in self.parents.items():
            client = self._clients[uri]
            try:
                if status == "finished":
                    _log_files(client, run_id, self.out_dir, REPORT_ARTIFACTS, plots=True)
                state = {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED")
                client.set_terminated(run_id, status=state)
            except Exception as err:  # noqa: BLE001 - the comparison's results are written; say what was not sent
                print(f"warning: MLflow did not get the comparison's report: {err}", file=sys.stderr, flush=True)
