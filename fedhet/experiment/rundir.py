"""One writer per run directory.

A run (``fedhet run``, a resume, one variant of ``fedhet compare``) holds an exclusive
``fcntl.flock`` on ``RUN_DIR/fedhet.lock`` while it writes there; the file records the holder's PID
for the error message another run gets. The kernel drops the lock when its holder ends, however it
ends (``kill -9`` included), so a lock file left by a dead run never blocks: the next run takes it
over. A process forked while the lock is held (a parallel-executor worker) closes its copy of the
lock, so the lock ends with the run and not with its last worker.

Once the lock is taken, temporary files a killed run left behind (``.checkpoint.pt.*.tmp`` and the
other ``.NAME.*.tmp`` of atomic writes) are removed. A fresh run into a folder that holds an earlier
run's results (a checkpoint or metrics) is refused unless ``overwrite``, which removes them first
(a disk client store is emptied by the fresh run itself).

The lock needs ``fcntl`` (POSIX systems); elsewhere runs are not locked against each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from fedhet.experiment.checkpoint import LATEST, PREVIOUS, restore_previous
from fedhet.experiment.config import ConfigError

try:
    import fcntl
except ImportError:  # not a POSIX system
    fcntl = None  # type: ignore[assignment]

LOCK = "fedhet.lock"
#: what a run writes into its folder and ``overwrite`` removes (config.yaml and dataset.json are rewritten)
RESULTS = (LATEST, PREVIOUS, "metrics.jsonl", "clients.jsonl", "metrics.csv", "devices.json", "commands.txt")
#: seconds to wait for a lock whose recorded holder has ended (its forked children close their copies)
SETTLE_S = 5.0

# folder -> descriptor of every lock this process holds
_held: dict[Path, int] = {}


class RunDirInUse(ConfigError):
    """Another process holds the run directory's lock."""


def _close_inherited() -> None:
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


def _recorded_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_use(run_dir: Path, path: Path, pid: int | None) -> RunDirInUse:
    who = f"pid {pid}" if pid is not None else "a process that recorded no pid"
    if pid is not None and not _running(pid):
        who += ", which has ended but left a process that still holds the lock"
    return RunDirInUse(
        f"run directory {run_dir} is in use by another fedhet run ({who}; lock file {path}); allowed: a run "
        "directory no other run is writing (wait for that run to end, or stop it)"
    )


def holder(run_dir: Path) -> int | None:
    """The PID of the process that holds ``run_dir``'s lock now, else None (nothing is written)."""
    path = Path(run_dir) / LOCK
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _recorded_pid(fd)
            return pid if pid is not None else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_free(run_dir: Path) -> None:
    """Raise ``RunDirInUse`` (naming the holder's PID) when another run holds ``run_dir``."""
    pid = holder(run_dir)
    if pid is not None:
        raise _in_use(Path(run_dir), Path(run_dir) / LOCK, None if pid < 0 else pid)


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[Path]:
    """Hold ``run_dir``'s lock (creating the folder), or raise ``RunDirInUse`` naming the holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    if fcntl is None:
        yield run_dir
        return
    path = run_dir / LOCK
    if key in _held:
        raise _in_use(run_dir, path, os.getpid())
    settle = time.monotonic() + SETTLE_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _recorded_pid(fd)
            os.close(fd)
            # a holder that has ended leaves processes that are ending too; no PID yet: it is starting
            if (pid is None or not _running(pid)) and time.monotonic() < settle:
                time.sleep(0.1)
                continue
            raise _in_use(run_dir, path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        # the holder before us removes the file when it ends: a lock on a removed file is no lock
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[key] = fd
        yield run_dir
    finally:
        _held.pop(key, None)
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: a process waiting on this file sees it gone and retries
        os.close(fd)


def remove_stale_files(run_dir: Path) -> list[Path]:
    """Remove the temporary files of atomic writes a killed run left (``.NAME.*.tmp``); only call
    this while holding the lock. Returns what was removed."""
    removed = []
    for path in Path(run_dir).glob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def earlier_run(run_dir: Path) -> str | None:
    """What an earlier run left in ``run_dir`` ("a finished run (3 of 3 rounds)", "a stopped run
    (2 of 5 rounds)"), or None when it holds no checkpoint and no metrics."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    has_rows = metrics.is_file() and metrics.stat().st_size > 0
    if not (has_rows or (run_dir / LATEST).exists() or (run_dir / PREVIOUS).exists()):
        return None
    done = None
    if has_rows:
        for line in reversed(metrics.read_text().splitlines()):
            try:
                done = int(json.loads(line)["round"])
                break
            except (ValueError, KeyError, TypeError):
                continue
    try:
        total = int(yaml.safe_load((run_dir / "config.yaml").read_text())["rounds"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        total = None
    if done is None or total is None:
        return "an earlier run's checkpoint"
    state = "finished" if done >= total else "stopped"
    return f"a {state} run ({done} of {total} rounds)"


def refuse_earlier_run(run_dir: Path, where: str, resume_hint: bool) -> None:
    """Raise when ``run_dir`` holds an earlier run's results (a fresh run without ``--overwrite``)."""
    found = earlier_run(run_dir)
    if found is None:
        return
    allowed = "another folder, or --overwrite to replace it"
    if resume_hint:
        allowed = (
            f"another folder, --resume {run_dir} to continue or extend it (rounds=N), or --overwrite to replace it"
        )
    raise ConfigError(f"{where}: {run_dir} holds {found}; allowed: {allowed}")


def remove_results(run_dir: Path) -> None:
    """Remove an earlier run's checkpoints and metrics (``--overwrite``); a disk client store is
    emptied by the fresh run itself."""
    run_dir = Path(run_dir)
    for name in RESULTS:
        (run_dir / name).unlink(missing_ok=True)


@contextlib.contextmanager
def claim(
    run_dir: Path,
    *,
    fresh: bool,
    overwrite: bool = False,
    from_previous: bool = False,
    where: str = "--run-dir",
    resume_hint: bool = True,
) -> Iterator[Path]:
    """Hold ``run_dir`` for one run: take the lock, remove stale temporary files, then for a fresh
    run refuse (or, with ``overwrite``, remove) an earlier run's results; for a resume with
    ``from_previous``, make the previous checkpoint the latest. The lock is released on exit."""
    with locked(run_dir) as held:
        remove_stale_files(held)
        if fresh:
            if not overwrite:
                refuse_earlier_run(held, where, resume_hint)
            remove_results(held)
        elif from_previous:
            restore_previous(held)
        yield held
