"""Downloading a file with a checksum: written to a temporary file beside its destination, checked,
then renamed into place, so a failed or corrupt download never leaves a file that looks complete."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path


def download_checked(url: str, dest: Path, digest: str, *, algorithm: str = "sha256", timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest``; OSError when the file's ``algorithm`` hex digest is not ``digest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    h = hashlib.new(algorithm)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != digest:
            raise OSError(f"downloaded {url} has {algorithm} {h.hexdigest()}, expected {digest}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
