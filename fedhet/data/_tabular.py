"""``tabular``: your own table, CSV / TSV / JSON Lines / Parquet, with a label or a target column.

- ``label`` names a classification column (any values; the classes are its distinct training
  values, sorted numerically when they are all numbers, else as text); ``target`` names a regression
  column (numbers; scored by Pearson and Spearman correlation and MSE).
- ``features``: the numeric columns the model sees (default: every column except the label or
  target and ``group``). They are standardized with the training split's mean and standard deviation
  (a constant column is only centred); the statistics are in the bundle's ``info`` and a run saves them.
- ``group``: a column whose values are the natural partition (a user, a site, a device): the
  ``natural`` partitioner gives each client whole groups.
- The test split: ``test_path`` (a second file with the same columns), or ``test_fraction`` (default
  0.2) of the rows held out, stratified by class (classification) or by target quintile (regression),
  seeded by ``seed``.

Every problem (a missing column, a non-numeric or empty feature cell, a label only in the test file)
is a one-line error naming the file, the column and, where it helps, the row.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhet.core.registry import DATASETS
from fedhet.core.rng import numpy_rng
from fedhet.data._checks import fail, fraction, reject_unknown
from fedhet.data._imagefolder import resolve_path
from fedhet.data.base import ArrayDataset
from fedhet.data.datasets import DatasetBundle
from fedhet.data.tasks import Classification, Regression

#: File suffixes read, by format.
FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def read_table(path: Path, delimiter: str | None = None) -> dict[str, list[Any]]:
    """Columns of a CSV/TSV (header row first), JSON Lines (one object a line) or Parquet file, in
    file order. CSV cells are strings; JSON and Parquet keep their types. ValueError names the file
    and line of a malformed row."""
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise fail("path", str(path), f"a file ending in {', '.join(FORMATS)}")
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading Parquet needs pyarrow: pip install -e '.[tabular]'") from None
        try:
            return {k: list(v) for k, v in pq.read_table(path).to_pydict().items()}
        except Exception as exc:  # pyarrow raises its own error types for unreadable files
            raise ValueError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    if kind == "jsonl":
        columns: dict[str, list[Any]] = {}
        with open(path, encoding="utf-8") as f:
            rows = []
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: not a JSON object ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{i}: not a JSON object (got {type(row).__name__})")
                rows.append(row)
        names = list(dict.fromkeys(k for row in rows for k in row))
        for name in names:
            columns[name] = [row.get(name) for row in rows]
        return columns
    sep = delimiter or ("\t" if kind == "tsv" else ",")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: empty file (a header row is needed)")
        header = [h.strip() for h in header]
        cols: list[list[Any]] = [[] for _ in header]
        for i, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{i}: {len(row)} fields, the header has {len(header)}")
            for c, cell in enumerate(row):
                cols[c].append(cell)
    return dict(zip(header, cols))


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(float(value)) else None
    try:
        v = float(str(value).strip())
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def numeric_column(table: dict[str, list[Any]], name: str, path: Path, role: str) -> np.ndarray:
    """Column ``name`` as float64; ValueError naming the file, column and first bad row."""
    values = table[name]
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        x = _number(v)
        if x is None:
            what = "empty" if v is None or str(v).strip() == "" else f"not a number ({v!r})"
            hint = "; list the numeric columns in data.options.features" if role == "feature" else ""
            raise ValueError(
                f"{path}: {role} column {name!r} row {i + 1} is {what}; allowed: finite numbers in every row{hint}"
            )
        out[i] = x
    return out


def _columns(value: Any, field: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise fail(field, value, "a column name or a non-empty list of column names")


def _require(table: dict[str, list[Any]], names: list[str], path: Path, field: str) -> None:
    for name in names:
        if name not in table:
            raise ValueError(f"{path}: no column {name!r} (data.{field}); columns: {', '.join(table)}")


def _class_names(values: list[Any]) -> tuple[str, ...]:
    distinct = {str(v).strip() for v in values}
    if all(_number(v) is not None for v in distinct):
        return tuple(sorted(distinct, key=lambda v: (float(v), v)))
    return tuple(sorted(distinct))


def held_out(strata: np.ndarray, test_fraction: float, seed: int, key: str) -> np.ndarray:
    """Boolean test mask: per stratum, round(test_fraction * n) rows (none from a stratum of one),
    drawn from a seed-keyed generator."""
    test = np.zeros(len(strata), dtype=bool)
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        k = int(np.floor(test_fraction * len(members) + 0.5)) if len(members) >= 2 else 0
        k = min(k, len(members) - 1)
        test[numpy_rng(seed, key, int(s)).choice(members, size=k, replace=False)] = True
    return test


def outcome_strata(values: list[Any], classification: bool, source: Path, column: str) -> np.ndarray:
    """The stratum of every row for a stratified split: its class, or its target's quintile."""
    if classification:
        names = _class_names(values)
        return np.array([names.index(str(v).strip()) for v in values])
    y = numeric_column({column: values}, column, source, "target")
    return np.searchsorted(np.quantile(y, [0.2, 0.4, 0.6, 0.8]), y, side="right")


def encode_outcome(
    train: list[Any], test: list[Any], classification: bool, source: Path, column: str
) -> tuple[np.ndarray, np.ndarray, Any, tuple[str, ...]]:
    """Training and test targets as arrays (class indices, or float targets), the task they pose and
    the class names (the column's name for regression). ValueError for a class only in the test rows
    or a single class."""
    if classification:
        names = _class_names(train)
        index = {c: i for i, c in enumerate(names)}
        unseen = sorted({str(v).strip() for v in test} - set(index))
        if unseen:
            raise ValueError(
                f"{source}: label {unseen[0]!r} occurs only in the test rows; training classes: {', '.join(names)}"
            )
        if len(names) < 2:
            raise ValueError(f"{source}: label column {column!r} has one class ({names[0]!r}); allowed: two or more")
        y_tr = np.array([index[str(v).strip()] for v in train], dtype=np.int64)
        y_te = np.array([index[str(v).strip()] for v in test], dtype=np.int64)
        return y_tr, y_te, Classification(), names
    y_tr = numeric_column({column: train}, column, source, "target")
    y_te = numeric_column({column: test}, column, source, "target") if len(test) else np.empty(0)
    low, high = float(y_tr.min()), float(y_tr.max())
    return y_tr, y_te, Regression(low=low, high=high if high > low else low + 1.0, strata_bins=5), (column,)


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """Both splits standardized with the training columns' mean and standard deviation (a constant
    column keeps std 1)."""
    mean = train.mean(axis=0) if len(train) else np.zeros(train.shape[1])
    std = train.std(axis=0) if len(train) else np.ones(train.shape[1])
    std = np.where(std > 1e-12, std, 1.0)
    tr = torch.from_numpy(((train - mean) / std).astype(np.float32))
    te = torch.from_numpy(((test - mean) / std).astype(np.float32))
    return tr, te, [float(v) for v in mean], [float(v) for v in std]


@DATASETS.register("tabular")
def tabular(
    *,
    root: str | None = None,
    seed: int = 0,
    path: str | None = None,
    test_path: str | None = None,
    label: str | None = None,
    target: str | None = None,
    features: list[str] | None = None,
    group: str | None = None,
    test_fraction: float | None = None,
    delimiter: str | None = None,
    **unknown: Any,
) -> DatasetBundle:
    """Your own table (CSV, TSV, JSON Lines or Parquet): a ``label`` column (classification) or a
    ``target`` column (regression) and numeric feature columns, standardized from the training split.

    Options:
        path: the file (required), absolute or relative to the data root.
        test_path: a test file with the same columns.
        label: the class column (classification).
        target: the number column (regression).
        features: the numeric columns the model sees (default: every other column).
        group: a column of natural groups (users, sites) for the natural partitioner.
        test_fraction: without test_path, the share of rows held out (default 0.2, stratified, seeded).
        delimiter: a CSV's field separator (default a comma; a tab for .tsv).
    """
    reject_unknown(
        "dataset 'tabular'",
        unknown,
        ["root", "seed", "path", "test_path", "label", "target", "features", "group", "test_fraction", "delimiter"],
    )
    if path is None:
        raise fail("path", None, "a CSV, TSV, JSON Lines or Parquet file (data.options.path)")
    if (label is None) == (target is None):
        raise fail(
            "label",
            label,
            "exactly one of data.options.label (a class column) and data.options.target (a number column)",
        )
    if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1):
        raise fail("delimiter", delimiter, "one character")
    outcome = label if label is not None else target
    role = "label" if label is not None else "target"
    if not isinstance(outcome, str) or not outcome:
        raise fail(role, outcome, "a column name")
    if group is not None and (not isinstance(group, str) or not group):
        raise fail("group", group, "a column name")
    group_col = [group] if group is not None else None
    feature_cols = _columns(features, "features")
    source = resolve_path(path, root)
    table = read_table(source, delimiter)
    _require(table, [outcome], source, role)
    if group_col:
        _require(table, group_col, source, "group")
    if feature_cols is None:
        feature_cols = [c for c in table if c != outcome and c not in (group_col or [])]
    _require(table, feature_cols, source, "features")
    if not feature_cols:
        raise fail("features", features, f"at least one column besides {outcome!r}")
    n = len(table[outcome])
    if n == 0:
        raise ValueError(f"{source}: no rows")

    if test_path is not None:
        if test_fraction is not None:
            raise fail("test_fraction", test_fraction, "nothing when data.options.test_path is given")
        test_source = resolve_path(test_path, root)
        test_table = read_table(test_source, delimiter)
        _require(test_table, [outcome, *feature_cols], test_source, "test_path")
        x_tr = np.stack([numeric_column(table, c, source, "feature") for c in feature_cols], axis=1)
        x_te = np.stack([numeric_column(test_table, c, test_source, "feature") for c in feature_cols], axis=1)
        out_tr, out_te = table[outcome], test_table[outcome]
        groups_tr = table[group_col[0]] if group_col else None
    else:
        test_fraction = fraction("test_fraction", 0.2 if test_fraction is None else test_fraction, allow_zero=False)
        x_all = np.stack([numeric_column(table, c, source, "feature") for c in feature_cols], axis=1)
        out_all = table[outcome]
        strata = outcome_strata(out_all, label is not None, source, outcome)
        test = held_out(strata, test_fraction, seed, "tabular_split")
        x_tr, x_te = x_all[~test], x_all[test]
        out_tr = [v for v, t in zip(out_all, test) if not t]
        out_te = [v for v, t in zip(out_all, test) if t]
        groups_tr = [v for v, t in zip(table[group_col[0]], test) if not t] if group_col else None

    ytr, yte, task, names = encode_outcome(out_tr, out_te, label is not None, source, outcome)
    if label is not None:
        y_tr, y_te = torch.from_numpy(ytr), torch.from_numpy(yte)
    else:
        y_tr, y_te = torch.from_numpy(ytr.astype(np.float32)), torch.from_numpy(yte.astype(np.float32))
    num_classes = len(names) if label is not None else 1
    xtr, xte, mean, std = standardize(x_tr, x_te)
    groups = None
    if groups_tr is not None:
        ids = {g: i for i, g in enumerate(dict.fromkeys(str(v) for v in groups_tr))}
        groups = np.array([ids[str(v)] for v in groups_tr], dtype=np.int64)
    return DatasetBundle(
        name="tabular",
        train=ArrayDataset(xtr, y_tr, task),
        test=ArrayDataset(xte, y_te, task),
        num_classes=num_classes,
        input_shape=(len(feature_cols),),
        class_names=names,
        groups=groups,
        info={
            "source": str(source),
            "test_source": str(resolve_path(test_path, root)) if test_path is not None else None,
            role: outcome,
            "features": list(feature_cols),
            "standardization": {"mean": mean, "std": std},
            "group": group_col[0] if group_col else None,
        },
    )


__all__ = ["FORMATS", "held_out", "numeric_column", "read_table", "standardize", "tabular"]
