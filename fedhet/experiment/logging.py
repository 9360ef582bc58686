"""Run-directory sinks: metrics as JSON Lines (the record) and CSV (for spreadsheets), per-client
rows, and a live progress display (a bar on a terminal, plain log lines otherwise)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedhet.experiment.checkpoint import atomic_write_bytes

METRICS = "metrics.jsonl"
CLIENTS = "clients.jsonl"
CSV = "metrics.csv"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


#: encodes a row that holds no NaN or infinity; one that does raises, and is cleaned first
_FINITE = json.JSONEncoder(allow_nan=False)


def _json_line(row: dict[str, Any]) -> str:
    """One JSON line for ``row``, non-finite floats written as null (JSON has no NaN): thousands of
    client rows a round are encoded as they are, and only a row that holds one is cleaned."""
    try:
        return _FINITE.encode(row) + "\n"
    except ValueError:
        return json.dumps({k: _clean(v) for k, v in row.items()}) + "\n"


DATASET = "dataset.json"
#: each client's device profile and capacity, and each size's needs (runs with device profiles)
DEVICES = "devices.json"


def write_run_header(run_dir: Path, config_yaml: str, data: Any) -> None:
    """Write a run folder's ``config.yaml`` (the resolved config, then a comment naming the data's
    classes) and ``dataset.json`` (``data.description()``: classes, shapes, client sizes and what the
    loader computed, such as the normalization statistics)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    described = data.description()
    names = described.get("class_names") or []
    note = f"# data: {described['name']}, {described['num_classes']} classes"
    note += f" ({', '.join(names)})" if names and len(names) <= 50 else ""
    (run_dir / "config.yaml").write_text(f"{config_yaml.rstrip()}\n{note}; see {DATASET}\n")
    (run_dir / DATASET).write_text(json.dumps(described, indent=1, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a crash ends the readable record
    return rows


class RunLog:
    """Appends one metrics row per round (and per-client rows) to the run directory, and hands each
    round to the run's other sinks (``logging.sinks``: TensorBoard, MLflow; see
    :mod:`fedhet.experiment.sinks`). It is the run folder's own sink: ``log_round``, ``checkpoint``
    and ``close`` are the sink calls, made by the round loop.

    A sink that fails mid-run is turned off for the rest of the run with a warning (the run and its
    run folder go on); one that cannot start raises before the first round."""

    def __init__(self, run_dir: Path, resume_round: int | None = None, sinks: Sequence[Any] = ()) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_round is not None:
            # rows written after the checkpoint was taken are redone by the resumed run
            for name in (METRICS, CLIENTS):
                rows = [r for r in read_jsonl(self.dir / name) if r.get("round", 0) <= resume_round]
                atomic_write_bytes(self.dir / name, "".join(json.dumps(r) + "\n" for r in rows).encode())
        else:
            for name in (METRICS, CLIENTS, CSV):
                (self.dir / name).unlink(missing_ok=True)
        self.rows = read_jsonl(self.dir / METRICS)
        self._columns: dict[str, None] = {}
        if self.rows:
            self._write_csv()
        self.sinks: list[Any] = []
        try:
            for sink in sinks:
                sink.start(self.dir, resume_round)
                self.sinks.append(sink)
        except BaseException:
            self.close("failed")
            raise
        if resume_round is None:
            from fedhet.experiment.sinks import prune_record

            prune_record(self.dir, _sink_names(sinks))

    def _each(self, call: str, *args: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, call)(*args)
            except Exception as err:  # noqa: BLE001 - a tracking service's failure must not end the run
                self.sinks.remove(sink)
                print(
                    f"warning: logging sink {_sink_name(sink)} failed ({type(err).__name__}: {err}); it is off for the "
                    "rest of this run (the run folder has every round; --resume sends it the rounds it missed)",
                    file=sys.stderr,
                    flush=True,
                )
                with contextlib.suppress(Exception):
                    sink.close("failed")

    def log_round(self, row: dict[str, Any], clients: list[dict[str, Any]], evaluated: bool = False) -> None:
        """Write round ``row["round"]``'s row and client rows; ``evaluated``: the round evaluated
        the clients (their rows hold ``eval_<metric>``)."""
        row = {k: _clean(v) for k, v in row.items()}
        if clients:
            with open(self.dir / CLIENTS, "a") as f:
                f.write("".join(_json_line(c) for c in clients))
        with open(self.dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        if all(k in self._columns for k in row):
            self._append_csv(row)  # the usual case: one line, not the whole file again
        else:
            self._write_csv()
        if self.sinks:
            self._each("log_round", row, clients, evaluated)

    def checkpoint(self, rnd: int) -> None:
        """The checkpoint of round ``rnd`` is written: the rounds up to it are what a resume keeps."""
        self._each("checkpoint", rnd)

    def close(self, status: str = "finished") -> None:
        """End the sinks: ``status`` is finished, stopped (interrupted) or failed."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close(status)
            except Exception as err:  # noqa: BLE001
                print(f"warning: logging sink {_sink_name(sink)} did not close cleanly: {err}", file=sys.stderr, flush=True)

    def _write_csv(self) -> None:
        """The whole CSV again, with every column seen so far (a new column appeared)."""
        self._columns = {}
        for r in self.rows:
            self._columns.update(dict.fromkeys(r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(self._columns))
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_bytes(self.dir / CSV, buf.getvalue().encode())

    def _append_csv(self, row: dict[str, Any]) -> None:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=list(self._columns)).writerow(row)
        with open(self.dir / CSV, "a") as f:
            f.write(buf.getvalue())


def _sink_name(sink: Any) -> str:
    from fedhet.experiment.sinks import SINKS

    return next((name for name, cls in SINKS.items() if isinstance(sink, cls)), type(sink).__name__)


def _sink_names(sinks: Sequence[Any]) -> list[str]:
    return [_sink_name(s) for s in sinks]


class Progress:
    """A rich progress bar (round, loss, accuracy, ETA) on a terminal; plain lines otherwise."""

    def __init__(self, total: int, start: int, name: str, mode: str = "auto") -> None:
        self.total = total
        self.name = name
        self.live = (mode == "bar") or (mode == "auto" and sys.stderr.isatty())
        self.quiet = mode == "off"
        self.t0 = time.perf_counter()
        self._bar = None
        if self.live and not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task(name, total=total, completed=start - 1, info="")
            self._bar.start()

    def update(self, rnd: int, row: dict[str, Any]) -> None:
        if self.quiet:
            return
        parts = []
        if row.get("train_loss") is not None:
            parts.append(f"loss {row['train_loss']:.4f}")
        metric = row.get("metric") or "accuracy"
        short = "acc" if metric == "accuracy" else metric
        acc = next((row[k] for k in row if k.endswith(f"/{metric}") and k.startswith("eval/") and row[k] is not None), None)
        if acc is not None:
            parts.append(f"{short} {acc:.4f}")
        if row.get(f"clients/{metric}_mean") is not None:
            parts.append(f"client {short} {row[f'clients/{metric}_mean']:.4f}")
        if row.get("failures"):
            parts.append(f"{int(row['failures'])} failed")
        info = "  ".join(parts)
        if self._bar is not None:
            self._bar.update(self._task, completed=rnd, info=info)
        else:
            elapsed = time.perf_counter() - self.t0
            print(f"[{self.name}] round {rnd}/{self.total}  {info}  ({elapsed:.1f}s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
