"""Reading a device file (profiles, availability traces): CSV or JSON, one object per row."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any


def read_rows(
    path: str | os.PathLike[str], field: str, what: str
) -> tuple[Path, list[dict[str, Any]], tuple[str, ...]]:
    """The file's path, its rows and its columns (a CSV's header; a JSON list's keys in order of
    first use). ``field`` names the config field in errors, ``what`` what each row holds. Errors:
    FileNotFoundError or ValueError, in one line naming the file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{field}: {p} not found")
    try:
        rows, columns = _read(p, field, what)
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{field}: {p} cannot be read ({err}); allowed: a UTF-8 .csv or .json file") from None
    if not rows:
        raise ValueError(f"{field}: {p} has no rows")
    return p, rows, columns


def _read(p: Path, field: str, what: str) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{field}: {p} is not valid JSON: {err.msg} at line {err.lineno}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{field}: {p} must hold a JSON list of objects ({what})")
        rows, columns = data, tuple(dict.fromkeys(k for r in data for k in r))
    elif suffix == ".csv":
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), tuple(reader.fieldnames or ())
    else:
        raise ValueError(f"{field}: {p} must be a .csv or .json file")
    return rows, columns
