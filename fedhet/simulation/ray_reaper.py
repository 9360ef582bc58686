"""Ends what a local Ray leaves behind when the driver that started it dies without stopping it.

A local Ray started by ``ray.init`` shares its fate with the driver: its head processes (GCS,
raylet, monitors) get the kernel's parent-death signal, and its workers end with the raylet. Ray's
agents (the dashboard and runtime-env agents), however, only give up about a minute after the
raylet has gone. So when ``RayExecutor`` starts a local Ray on Linux it also starts this watcher, a
small child process of the driver, run as a script (standard library only) with the driver's PID
and the PIDs of Ray's head processes:

- every ``INTERVAL`` seconds it records the head processes and all their descendants, each with its
  start time (so that a PID used again later by another process is never mistaken for it);
- when the driver has died (the watcher's parent is no longer the driver, or the driver's end of
  the stdin pipe closed without a word) it sends SIGKILL to every recorded process that is still
  the process it recorded, and exits;
- it exits without touching anything when the driver writes ``stop`` to its stdin (Ray was shut
  down). When the head processes end without that word following within ``GRACE`` seconds (Ray
  was shut down some other way), it ends what they left and exits.

It ignores SIGINT: Ctrl-C reaches the whole process group, and the driver's own cleanup then stops
Ray and tells the watcher to stop. Linux only (it reads /proc).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

INTERVAL = 0.25
#: how long to wait for the driver's word once Ray's head processes have ended (seconds)
GRACE = 2.0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[19])


def watch(driver: int, roots: list[int]) -> int:
    known: dict[int, int] = {}
    stdin = sys.stdin.fileno()

    def record() -> None:
        todo = list(roots)
        while todo:
            pid = todo.pop()
            start = _start_time(pid)
            if start is None or known.setdefault(pid, start) != start:
                continue
            todo.extend(_children(pid))

    def told(timeout: float) -> str | None:
        """``stop``, ``gone`` (end of file: the driver's end closed as it exited) or None."""
        ready, _, _ = select.select([stdin], [], [], timeout)
        if not ready:
            return None
        data = os.read(stdin, 64)
        return "stop" if b"stop" in data else ("gone" if not data else None)

    while os.getppid() == driver:
        record()
        if not any(_start_time(r) == known.get(r) for r in roots):
            # Ray's head processes ended: the driver shut Ray down (it says stop right after) or is
            # dying (its end of the pipe closes, it stops being this process's parent)
            end = time.monotonic() + GRACE
            while os.getppid() == driver and time.monotonic() < end:
                said = told(INTERVAL)
                if said == "stop":
                    return 0
                if said == "gone":
                    break
            break
        said = told(INTERVAL)
        if said == "stop":
            return 0
        if said == "gone":
            break
    record()
    for pid, start in known.items():
        if _start_time(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return 0


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return watch(int(argv[0]), [int(p) for p in argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
