"""CIFAR-10 files on disk: find them, decode them once, and cache the pixels as uint8 ``.npy`` arrays.

Accepted sources, looked for in this order inside the data root and in its ``cifar10_jpeg/`` and
``cifar10/`` sub-folders:

1. the official python pickles, a ``cifar-10-batches-py/`` folder (``data_batch_1`` .. ``_5``,
   ``test_batch``), or a folder holding those files directly;
2. the official ``cifar-10-python.tar.gz`` (read without unpacking);
3. a folder of class-named image folders, ``train/<class>/*.{jpg,png}`` and ``test/<class>/...``;
4. zip archives (``*.zip``) whose members are ``[...]/train/<class>/<file>`` and
   ``[...]/test/<class>/<file>``, e.g. ``cifar10_train_jpeg.zip`` + ``cifar10_test_jpeg.zip``; in the
   data root itself only zips with "cifar" in their name, in the sub-folders every zip.

The root itself may also be a ``.tar.gz`` or a ``.zip`` file. Labels are positions in the official
class order (:data:`CLASSES`). Decoded splits are cached under ``$FEDHET_CACHE`` (default
``~/.cache/fedhet``) in a folder keyed by the source's paths, sizes and modification times, so
changing or replacing the source decodes it again. Cache files are written to a temporary name and
renamed into place, so an interrupted decode never leaves a truncated array that a later load reads.

The pickles are Python pickles: only point the loader at copies you trust (a downloaded tarball is
checked against the official md5 before it is read).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
import tempfile
import time
import urllib.error
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhet.data.fetch import download_checked

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
SPLITS = ("train", "test")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
TARBALL = "cifar-10-python.tar.gz"
PICKLE_DIR = "cifar-10-batches-py"
PICKLES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
SUBFOLDERS = ("cifar10_jpeg", "cifar10")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Bumped whenever the cached array layout changes, so old caches are not read.
CACHE_FORMAT = 1
_CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder searched for CIFAR-10: ``root``, else ``$FEDHET_DATA``, else ``~/.cache/fedhet/data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("FEDHET_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedhet" / "data"


def cache_root() -> Path:
    env = os.environ.get("FEDHET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedhet"


@dataclass(frozen=True)
class Source:
    """A located copy of CIFAR-10: its kind, where it is, and the files whose stat keys the cache."""

    kind: str  # "pickles" | "tarball" | "folders" | "zips"
    path: Path
    files: tuple[Path, ...]

    def cache_key(self) -> str:
        h = hashlib.blake2b(digest_size=10)
        h.update(f"cifar10-v{CACHE_FORMAT}\x1f{self.kind}".encode())
        for f in self.files:
            st = f.stat()
            h.update(f"\x1f{f.resolve()}\x1f{st.st_size}\x1f{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def describe(self) -> str:
        return f"{self.kind} at {self.path}"


# ------------------------------------------------------------------------------------- locating


def _searched(root: Path) -> list[Path]:
    return [root, *(root / sub for sub in SUBFOLDERS)]


def _class_dirs(folder: Path) -> bool:
    return all((folder / split).is_dir() for split in SPLITS)


def _image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder/<split>/<class>/`` (sorted), for the cache key."""
    found = []
    for split in SPLITS:
        with os.scandir(folder / split) as classes:
            for cls in classes:
                if cls.is_dir() and not cls.name.startswith("."):
                    with os.scandir(cls.path) as entries:
                        found.extend(
                            Path(e.path) for e in entries
                            if e.name.lower().endswith(IMAGE_SUFFIXES) and not e.name.startswith(".")
                        )  # fmt: skip
    return sorted(found)


def find_source(root: Path) -> Source | None:
    """The first CIFAR-10 copy found in ``root`` (see the module docstring for the order), or None."""
    if root.is_file():
        name = root.name.lower()
        if name.endswith((".tar.gz", ".tgz")):
            return Source("tarball", root, (root,))
        if name.endswith(".zip"):
            return Source("zips", root, (root,))
        return None
    for folder in _searched(root):
        if not folder.is_dir():
            continue
        for pickles in (folder / PICKLE_DIR, folder):
            names = [*PICKLES["train"], *PICKLES["test"]]
            if all((pickles / n).is_file() for n in names):
                return Source("pickles", pickles, tuple(pickles / n for n in names))
        if (folder / TARBALL).is_file():
            return Source("tarball", folder / TARBALL, (folder / TARBALL,))
        if _class_dirs(folder):
            return Source("folders", folder, tuple(_image_files(folder)))
        # In the data root itself only zips named like CIFAR-10 count (it may hold other datasets).
        zips = sorted(
            p for p in folder.glob("*.zip") if p.is_file() and (folder != root or "cifar" in p.name.lower())
        )
        if zips:
            return Source("zips", folder, tuple(zips))
    return None


def not_found_message(root: Path, download_note: str) -> str:
    looked = "\n".join(f"  - {p}" for p in _searched(root)) if not root.is_file() else f"  - {root}"
    return (
        f"CIFAR-10 was not found. Looked in:\n{looked}\n"
        "for any of: the official python pickles (cifar-10-batches-py/ with data_batch_1..5 and "
        f"test_batch), the official {TARBALL}, class-named image folders train/<class>/*.jpg|png and "
        "test/<class>/..., or zip archives holding such folders (e.g. cifar10_jpeg/cifar10_train_jpeg.zip "
        "and cifar10_test_jpeg.zip).\n"
        "Provide the data by passing root=<folder>, or by setting FEDHET_DATA to a folder that contains "
        f"cifar10_jpeg/ or {PICKLE_DIR}/, or by placing {TARBALL} from {URL} in {root}.\n"
        f"{download_note}"
    )


def download(dest_dir: Path, *, timeout: float = 60.0) -> Path:
    """Fetch the official tarball into ``dest_dir``, check its md5 and rename it into place."""
    dest = dest_dir / TARBALL
    log.info("downloading CIFAR-10 from %s to %s", URL, dest)
    return download_checked(URL, dest, MD5, algorithm="md5", timeout=timeout)


def locate(root: str | os.PathLike[str] | None = None, *, allow_download: bool = True) -> Source:
    """Find CIFAR-10 under the resolved data root, downloading the official tarball when nothing is
    there and ``allow_download``; otherwise raise FileNotFoundError saying where it looked."""
    base = data_root(root)
    source = find_source(base)
    if source is not None:
        return source
    if not allow_download:
        raise FileNotFoundError(not_found_message(base, "Downloading was turned off (download=False)."))
    try:
        path = download(base)
    except (urllib.error.URLError, OSError) as exc:
        raise FileNotFoundError(not_found_message(base, f"Downloading from {URL} failed: {exc}")) from exc
    return Source("tarball", path, (path,))


# ------------------------------------------------------------------------------------- decoding


def decode_image(data: bytes, where: str) -> np.ndarray:
    """One encoded image -> (32, 32, 3) uint8 RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"))
    if arr.shape != (32, 32, 3):
        raise ValueError(f"{where}: image is {arr.shape[1]}x{arr.shape[0]}, CIFAR-10 images are 32x32")
    return arr


def _member_label(name: str, split: str) -> int | None:
    """Label of a ``[...]/<split>/<class>/<file>`` image path, None for anything else."""
    parts = name.replace("\\", "/").split("/")
    if len(parts) < 3 or parts[-3] != split or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return None
    if any(p.startswith(("__MACOSX", ".")) and p != "." for p in parts):
        return None
    if parts[-2] not in _CLASS_INDEX:
        raise ValueError(
            f"{name}: class folder {parts[-2]!r} is not a CIFAR-10 class; allowed: {', '.join(CLASSES)} "
            "(for other images use dataset: imagefolder with data.options.path)"
        )
    return _CLASS_INDEX[parts[-2]]


def _decode_items(
    items: list[tuple[int, str, Any]], read: Callable[[Any], bytes]
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``(label, name, handle)`` items (sorted by label then name) into NCHW uint8 + labels."""
    items.sort(key=lambda it: (it[0], it[1]))
    x = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
    y = np.empty(len(items), dtype=np.int64)
    for i, (label, name, handle) in enumerate(items):
        x[i] = decode_image(read(handle), name)
        y[i] = label
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y


def _read_zips(source: Source, split: str) -> tuple[np.ndarray, np.ndarray]:
    archives = [zipfile.ZipFile(p) for p in source.files]
    try:
        items = []
        for z in archives:
            for info in z.infolist():
                if not info.is_dir():
                    label = _member_label(info.filename, split)
                    if label is not None:
                        items.append((label, f"{z.filename}:{info.filename}", (z, info)))
        return _decode_items(items, lambda h: h[0].read(h[1]))
    finally:
        for z in archives:
            z.close()


def _read_folders(source: Source, split: str) -> tuple[np.ndarray, np.ndarray]:
    items = []
    for f in source.files:
        label = _member_label(str(f.relative_to(source.path)), split)
        if label is not None:
            items.append((label, str(f), f))
    return _decode_items(items, lambda f: f.read_bytes())


def _from_batches(batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
    y = np.concatenate([np.asarray(b[b"labels"], dtype=np.int64) for b in batches])
    return np.ascontiguousarray(x), y


def _read_pickles(source: Source, split: str) -> tuple[np.ndarray, np.ndarray]:
    batches = []
    for name in PICKLES[split]:
        with open(source.path / name, "rb") as f:
            batches.append(pickle.load(f, encoding="bytes"))
    return _from_batches(batches)


def _read_tarball(source: Source, split: str) -> tuple[np.ndarray, np.ndarray]:
    wanted = {name: i for i, name in enumerate(PICKLES[split])}
    found: dict[int, dict] = {}
    with tarfile.open(source.path, "r:*") as tar:
        for member in tar:
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and base in wanted:
                f = tar.extractfile(member)
                assert f is not None
                found[wanted[base]] = pickle.load(f, encoding="bytes")
    missing = [n for n, i in wanted.items() if i not in found]
    if missing:
        raise ValueError(f"{source.path}: the archive has no {', '.join(missing)}; is it cifar-10-python.tar.gz?")
    return _from_batches([found[i] for i in range(len(wanted))])


_READERS = {"zips": _read_zips, "folders": _read_folders, "pickles": _read_pickles, "tarball": _read_tarball}


# ------------------------------------------------------------------------------------- caching


def _save_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is as readable as any other data file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cache_dir(source: Source) -> Path:
    return cache_root() / "cifar10" / source.cache_key()


def read_split(source: Source, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split as ``(x uint8 (N, 3, 32, 32), y int64 (N,))``, from the cache when it is there (then
    ``x`` is a copy-on-write memory map of the cache file)."""
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}, allowed: {', '.join(SPLITS)}")
    folder = cache_dir(source)
    x_path, y_path = folder / f"{split}_x.npy", folder / f"{split}_y.npy"
    if x_path.is_file() and y_path.is_file():
        # Copy-on-write mapping: pages come straight from the page cache as the caller converts them,
        # and the array stays writable (torch.from_numpy warns on read-only arrays).
        return np.load(x_path, mmap_mode="c"), np.load(y_path)

    start = time.perf_counter()
    log.info("decoding the CIFAR-10 %s split from %s (once; cached in %s)", split, source.describe(), folder)
    x, y = _READERS[source.kind](source, split)
    if len(y) == 0:
        raise ValueError(f"CIFAR-10 source {source.describe()} has no {split} images")
    absent = [CLASSES[c] for c in range(len(CLASSES)) if not (y == c).any()]
    if absent:
        raise ValueError(
            f"CIFAR-10 source {source.describe()} has no {split} images of class {absent[0]!r}; a subset of the "
            "classes is another dataset: use dataset: imagefolder with data.options.path (its classes, its statistics)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    # The labels are written last: a load only trusts the cache once both files are in place, and the
    # image array, which takes longest to write, is complete before that.
    _save_atomic(x_path, x)
    _save_atomic(y_path, y)
    readme = folder / "SOURCE.txt"
    if not readme.exists():
        try:
            readme.write_text(f"{source.describe()}\n")
        except OSError:
            pass
    log.info("decoded %d %s images in %.1f s", len(y), split, time.perf_counter() - start)
    return x, y
