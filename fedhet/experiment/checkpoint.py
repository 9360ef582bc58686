"""Atomic checkpoints: a crash while writing never leaves a corrupt latest checkpoint.

The file is written to a temporary name in the same folder, flushed and fsync'd, then renamed over
the old one (``os.replace`` is atomic on POSIX and Windows); the folder is fsync'd so the rename is
durable. A reader therefore sees either the previous checkpoint or the new one, whole.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

LATEST = "checkpoint.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(run_dir) / LATEST
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / LATEST
    if not path.exists():
        return None
    # The checkpoint holds the algorithm's state dataclasses, so it is unpickled in full: load only
    # checkpoints this installation wrote.
    return torch.load(path, map_location="cpu", weights_only=False)
