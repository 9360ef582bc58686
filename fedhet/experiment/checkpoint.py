"""Atomic checkpoints: a crash while writing never leaves a corrupt latest checkpoint.

The file is written to a temporary name in the same folder, flushed and fsync'd, then renamed over
the old one (``os.replace`` is atomic on POSIX and Windows); the folder is fsync'd so the rename is
durable. A reader therefore sees either the previous checkpoint or the new one, whole.

The checkpoint before the latest is kept beside it as ``checkpoint.prev.pt``: before a new latest is
renamed into place, the old one becomes the previous one (a hard link, or a copy where the file
system has none, renamed over the older previous). At every moment both names hold whole
checkpoints, so a latest that was damaged afterwards (a disk error, a truncated copy) still leaves
a run to resume from. A checkpoint that cannot be read raises ``CheckpointError``, one line naming
the file.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedhet.experiment.config import ConfigError

LATEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be read (cut short, damaged, or not a fedhet checkpoint)."""


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
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a whole copy of ``src`` in one rename: a hard link under a temporary name (a
    byte copy, fsync'd, where the file system has no hard links), renamed over ``dst``."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(run_dir) / LATEST
    if path.exists():
        atomic_copy(path, path.with_name(PREVIOUS))
    atomic_write_bytes(path, buf.getvalue())  # fsyncs the folder: both renames are durable
    return path


def load_checkpoint(run_dir: Path, previous: bool = False) -> dict[str, Any] | None:
    """The latest checkpoint (``previous``: the one before it), or None when there is none.
    Raises ``CheckpointError`` when the file cannot be read."""
    path = Path(run_dir) / (PREVIOUS if previous else LATEST)
    if not path.exists():
        return None
    # The checkpoint holds the algorithm's state dataclasses, so it is unpickled in full: load only
    # checkpoints this installation wrote.
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except ImportError as err:  # whole, but its state's classes come from a module not imported here
        raise CheckpointError(
            f"checkpoint {path}: its state needs a module that is not loaded ({type(err).__name__}: {err}); "
            "allowed: the modules the run used (fedhet run --plugin MODULE)"
        ) from None
    except Exception as err:  # a cut-short or damaged file: zipfile, pickle and torch raise many kinds
        raise CheckpointError(_unreadable(path, f"{type(err).__name__}: {err}", previous)) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("round"), int):
        raise CheckpointError(_unreadable(path, "not a fedhet checkpoint (no round number)", previous))
    return payload


def _unreadable(path: Path, why: str, previous: bool) -> str:
    why = " ".join(why.split())
    why = why if len(why) <= 160 else why[:157] + "..."
    text = f"checkpoint {path}: cannot be read ({why}); allowed: a whole checkpoint fedhet wrote"
    if not previous and path.with_name(PREVIOUS).exists():
        text += f" (the one before it is kept: fedhet run --resume {path.parent} --from-previous continues from {PREVIOUS})"
    return text


def missing_previous(run_dir: Path) -> str:
    return (
        f"--from-previous: {Path(run_dir) / PREVIOUS} does not exist; allowed: a run folder that has written at least "
        "two checkpoints (the previous one is kept from the second on)"
    )


def restore_previous(run_dir: Path) -> int:
    """Make the previous checkpoint the latest again (the latest is replaced) and return its round;
    a resume then continues from it. Raises ``CheckpointError`` when there is no readable previous
    checkpoint."""
    run_dir = Path(run_dir)
    payload = load_checkpoint(run_dir, previous=True)
    if payload is None:
        raise CheckpointError(missing_previous(run_dir))
    atomic_copy(run_dir / PREVIOUS, run_dir / LATEST)
    _fsync_dir(run_dir)
    return int(payload["round"])
