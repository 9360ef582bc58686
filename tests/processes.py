"""Finding, checking and stopping the processes a test started (Linux: read from /proc)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fedhet.runtime.flower.local import descendants
from fedhet.runtime.flower.local import running as alive


def children(pid: int) -> set[int]:
    """Every live descendant of ``pid``."""
    return {p for p in descendants(pid) if alive(p)}


def gone(pids: set[int], seconds: float = 20.0) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def listening_addresses(pids: set[int]) -> set[str]:
    """The local addresses of the TCP sockets those processes listen on (from /proc/net/tcp*)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    found: set[str] = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                raw = cols[1].split(":")[0]
                if width == 8:
                    found.add(".".join(str(int(raw[i : i + 2], 16)) for i in (6, 4, 2, 0)))
                else:  # an IPv4-mapped IPv6 address ends in the IPv4 address; anything else is shown raw
                    found.add(".".join(str(int(raw[i : i + 2], 16)) for i in (30, 28, 26, 24)) if raw[:24] == "0000000000000000FFFF0000" else raw)
    return found
