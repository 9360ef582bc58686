"""``imagefolder``: any folder or zip of class-named image folders, decoded once and cached.

Layouts (inside the folder, inside each zip, or under one wrapping folder of either):

- ``train/<class>/<image>`` and ``test/<class>/<image>``: the two splits as given;
- ``<class>/<image>``: one tree, split per class by ``test_fraction`` (seeded by ``seed``).

A folder that holds no image folders but ``*.zip`` files is read as the union of its zips. Images are
PNG or JPEG (any file Pillow opens with one of the suffixes in :data:`IMAGE_SUFFIXES`); class names
are the folder names, sorted, any count. Every image must have the size of the first one unless
``size`` resizes all of them; ``channels`` is 1 (grayscale), 3 (RGB) or ``auto`` (1 when every image
is grayscale). Pixels are scaled to [0, 1] and standardized per channel with the mean and standard
deviation of the training split, which the bundle's ``info`` carries (and a run saves).

Decoded splits are cached as uint8 arrays under ``$FEDHET_CACHE/imagefolder/<key>``, the key covering
every source file's path, size and modification time and the decoding options, so editing the source
decodes it again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhet.core.registry import DATASETS
from fedhet.core.rng import numpy_rng
from fedhet.data._checks import fail, fraction, integer, reject_unknown
from fedhet.data._cifar10 import _save_atomic, cache_root, data_root
from fedhet.data.base import ArrayDataset
from fedhet.data.datasets import DatasetBundle
from fedhet.data.transforms import RandomCropFlip

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Item:
    """One image: its split (``None`` in a one-tree layout), class folder, display name and how to
    read its bytes."""

    split: str | None
    label: str
    name: str
    read: Callable[[], bytes]


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith(IMAGE_SUFFIXES) and not base.startswith(".")


def _hidden(parts: list[str]) -> bool:
    return any(p.startswith((".", "__MACOSX")) for p in parts)


def _classify(parts: list[str]) -> tuple[str | None, str]:
    """(split, class) of an image at ``parts`` (relative path components)."""
    split = parts[-3] if len(parts) >= 3 and parts[-3] in SPLITS else None
    return split, parts[-2]


def _folder_items(folder: Path) -> tuple[list[Item], list[str], list[tuple[str, int, int]]]:
    """Images under ``folder``, empty class folders (relative paths), and (path, size, mtime) of
    every image for the cache key."""
    items, empty, stats = [], [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__MACOSX")))
        rel = Path(dirpath).relative_to(folder).parts
        images = sorted(f for f in filenames if _is_image(f))
        if not dirnames and not images and rel and (rel[-1] not in SPLITS):
            empty.append("/".join(rel))
        for f in images:
            parts = [*rel, f]
            if len(parts) < 2 or _hidden(parts):
                continue
            path = Path(dirpath) / f
            st = path.stat()
            stats.append((str(path), st.st_size, st.st_mtime_ns))
            split, label = _classify(parts)
            items.append(Item(split, label, str(path), path.read_bytes))
    return items, empty, stats


def _zip_items(paths: list[Path]) -> tuple[list[Item], list[str], list[tuple[str, int, int]]]:
    items, empty, stats = [], [], []
    for p in paths:
        st = p.stat()
        stats.append((str(p), st.st_size, st.st_mtime_ns))
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
        files = {n for n in names if not n.endswith("/")}
        for n in sorted(names):
            parts = n.rstrip("/").split("/")
            if _hidden(parts):
                continue
            if n.endswith("/"):
                if parts[-1] not in SPLITS and not any(f.startswith(n) for f in files):
                    empty.append(f"{p.name}:{n}")
                continue
            if not _is_image(n) or len(parts) < 2:
                continue
            split, label = _classify(parts)

            def read(p: Path = p, n: str = n) -> bytes:
                with zipfile.ZipFile(p) as z:
                    return z.read(n)

            items.append(Item(split, label, f"{p}:{n}", read))
    return items, empty, stats


def resolve_path(path: Any, root: Any) -> Path:
    """``path`` as given (``~`` expanded) when it exists, else relative to the data root; a clear
    FileNotFoundError naming ``data.options.path`` otherwise."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise fail("path", path, "a folder or .zip file of class-named image folders")
    given = Path(path).expanduser()
    candidates = list(dict.fromkeys([given, data_root(root) / given]))
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"data.path: {str(path)!r} does not exist (looked at {' and '.join(map(str, candidates))})")


def list_images(path: Path) -> tuple[list[Item], list[tuple[str, int, int]]]:
    """Every image of the source at ``path`` (a folder, a zip, or a folder of zips), and the file
    stats that key its cache. ValueError for a source with no images or with an empty class folder."""
    if path.is_file():
        if not path.name.lower().endswith(".zip"):
            raise fail("path", str(path), "a folder or a .zip file")
        items, empty, stats = _zip_items([path])
    else:
        items, empty, stats = _folder_items(path)
        if not items:
            zips = sorted(p for p in path.glob("*.zip") if p.is_file())
            if zips:
                items, empty, stats = _zip_items(zips)
    if empty:
        raise ValueError(f"data.path: class folder {empty[0]} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if not items:
        raise ValueError(
            f"data.path: {path} holds no images in class folders; allowed layouts: train/<class>/<image> with "
            f"test/<class>/<image>, or <class>/<image> (images {', '.join(IMAGE_SUFFIXES)})"
        )
    return items, stats


# ------------------------------------------------------------------------------------- decoding


def _decode(item: Item, size: tuple[int, int] | None, channels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, C) uint8 pixels of one image (resized to ``size`` = (H, W) when given) and its
    original (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(item.read())) as img:
            original = (img.height, img.width)
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and (img.height, img.width) != size:
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{item.name}: not a readable image ({type(exc).__name__}: {exc})") from None
    return (arr[:, :, None] if arr.ndim == 2 else arr), original


def _gray(item: Item) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(item.read())) as img:
            return img.mode in GRAY_MODES
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{item.name}: not a readable image ({type(exc).__name__}: {exc})") from None


def decode_items(items: list[Item], size: tuple[int, int] | None, channels: int) -> np.ndarray:
    """(N, C, H, W) uint8 of ``items`` in order; without ``size`` every image must have the first's
    size (ValueError naming the first that differs)."""
    if not items:
        return np.empty((0, channels, *(size or (1, 1))), dtype=np.uint8)
    out: np.ndarray | None = None
    first = ""
    for i, item in enumerate(items):
        arr, original = _decode(item, size, channels)
        if out is None:
            out = np.empty((len(items), *arr.shape), dtype=np.uint8)
            first = f"{item.name} ({original[1]}x{original[0]})"
        elif arr.shape != out.shape[1:]:
            raise ValueError(
                f"{item.name}: image is {original[1]}x{original[0]}, unlike {first}; set data.options.size "
                "(e.g. 32 or [32, 32]) to resize every image"
            )
        out[i] = arr
    assert out is not None
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


# ------------------------------------------------------------------------------------- options


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return integer("size", value[0], minimum=1), integer("size", value[1], minimum=1)
    if isinstance(value, int) and not isinstance(value, bool):
        n = integer("size", value, minimum=1)
        return n, n
    raise fail("size", value, "an integer (square images) or [height, width], or nothing to keep the native size")


def _channels(value: Any) -> int | str:
    if value in (1, 3, "auto") and not isinstance(value, bool):
        return value
    raise fail("channels", value, "1 (grayscale), 3 (RGB) or auto")


def _split_one_tree(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask: per class, round(test_fraction * n) images (at least 1 and at most n - 1
    when the class has 2 or more), drawn with a seed-keyed generator."""
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(np.floor(test_fraction * len(members) + 0.5))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        else:
            k = 0
        chosen = numpy_rng(seed, "imagefolder_split", int(c)).choice(members, size=k, replace=False)
        test[chosen] = True
    return test


# ------------------------------------------------------------------------------------- loader


def _cache_key(stats: list[tuple[str, int, int]], size: Any, channels: Any, test_fraction: Any, seed: int) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps([CACHE_FORMAT, sorted(stats), size, channels, test_fraction, seed]).encode())
    return h.hexdigest()


def read_imagefolder(
    path: Path, *, size: tuple[int, int] | None, channels: int | str, test_fraction: float | None, seed: int
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...], int]:
    """Both splits as ``{split: (x uint8 (N, C, H, W), y int64)}``, the class names and the channel
    count, from the cache when it is there."""
    items, stats = list_images(path)
    splits = {it.split for it in items}
    if None in splits and len(splits) > 1:
        stray = next(it.name for it in items if it.split is None)
        raise ValueError(f"{stray}: outside train/ and test/ while the source has those folders; use one layout")
    one_tree = splits == {None}
    if one_tree and test_fraction is None:
        test_fraction = 0.2
    if not one_tree:
        if test_fraction is not None:
            raise fail("test_fraction", test_fraction, "nothing: the source has its own train/ and test/ folders")
        if "train" not in splits or "test" not in splits:
            missing = "test" if "test" not in splits else "train"
            raise ValueError(f"data.path: {path} has no images in {missing}/<class>/; it needs both train/ and test/")
    folder = cache_root() / "imagefolder" / _cache_key(stats, size, channels, test_fraction, seed)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        arrays = {s: (np.load(folder / f"{s}_x.npy", mmap_mode="c"), np.load(folder / f"{s}_y.npy")) for s in SPLITS}
        return arrays, tuple(meta["classes"]), int(meta["channels"])

    classes = tuple(sorted({it.label for it in items if it.split in ("train", None)}))
    index = {c: i for i, c in enumerate(classes)}
    unseen = sorted({it.label for it in items if it.split == "test"} - set(classes))
    if unseen:
        raise ValueError(
            f"data.path: test class {unseen[0]!r} has no training images (training classes: {', '.join(classes)})"
        )
    if channels == "auto":
        channels = 1 if all(_gray(it) for it in items) else 3
    start = time.perf_counter()
    log.info("imagefolder: decoding %d images from %s (once; cached in %s)", len(items), path, folder)
    items = sorted(items, key=lambda it: (it.split or "", index[it.label], it.name))
    x = decode_items(items, size, int(channels))
    y = np.array([index[it.label] for it in items], dtype=np.int64)
    if one_tree:
        test = _split_one_tree(y, float(test_fraction), seed)
    else:
        test = np.array([it.split == "test" for it in items])
    arrays = {"train": (x[~test], y[~test]), "test": (x[test], y[test])}
    folder.mkdir(parents=True, exist_ok=True)
    for s, (xs, ys) in arrays.items():
        _save_atomic(folder / f"{s}_x.npy", xs)
        _save_atomic(folder / f"{s}_y.npy", ys)
    meta_path.write_text(json.dumps({"source": str(path), "classes": list(classes), "channels": int(channels)}))
    log.info("imagefolder: decoded %d images in %.1f s", len(y), time.perf_counter() - start)
    return arrays, classes, int(channels)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) pixels scaled to [0, 1]
    (float64 sums; a constant channel gets std 1)."""
    c = x.shape[1]
    mean, std = [], []
    for ch in range(c):
        v = x[:, ch].astype(np.float64) / 255.0
        m = float(v.mean())
        s = float(v.std())
        mean.append(m)
        std.append(s if s > 1e-9 else 1.0)
    return tuple(mean), tuple(std)


def normalize(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel."""
    c = x.shape[1]
    out = torch.empty(x.shape, dtype=torch.float32)
    out.copy_(torch.from_numpy(np.asarray(x)))
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, c, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(1, c, 1, 1)
    return out.mul_(scale).add_(shift)


@DATASETS.register("imagefolder")
def imagefolder(
    *,
    root: str | None = None,
    seed: int = 0,
    path: str | None = None,
    size: int | list[int] | None = None,
    channels: int | str = "auto",
    test_fraction: float | None = None,
    augment: bool = False,
    **unknown: Any,
) -> DatasetBundle:
    """Your own images: a folder or zip of class-named image folders (any classes, sizes, PNG/JPEG).

    Layouts ``train/<class>/*`` with ``test/<class>/*``, or ``<class>/*`` split per class. Normalized
    per channel with the training split's mean and std (in ``info``, saved with a run). Decoded once
    and cached.

    Options:
        path: the folder or .zip (required), absolute or relative to the data root.
        size: resize every image to this (an integer, or [height, width]); unset: keep the native
            size, which must then be the same for every image.
        channels: 1 (grayscale), 3 (RGB) or auto (1 when every image is grayscale).
        test_fraction: with one tree, the share of each class held out as the test split (default
            0.2, seeded by seed).
        augment: random crops (padding of 1/8 of the height) and horizontal flips in training.
    """
    reject_unknown(
        "dataset 'imagefolder'", unknown, ["root", "seed", "path", "size", "channels", "test_fraction", "augment"]
    )
    if path is None:
        raise fail("path", None, "a folder or .zip file of class-named image folders (data.options.path)")
    source = resolve_path(path, root)
    size_t = _size(size)
    channels = _channels(channels)
    if test_fraction is not None:
        test_fraction = fraction("test_fraction", test_fraction, allow_zero=False)
    if not isinstance(augment, bool):
        raise fail("augment", augment, "true or false")
    arrays, classes, c = read_imagefolder(
        source, size=size_t, channels=channels, test_fraction=test_fraction, seed=seed
    )
    (x_tr, y_tr), (x_te, y_te) = arrays["train"], arrays["test"]
    missing = [classes[i] for i in range(len(classes)) if not (y_tr == i).any()]
    if missing:
        raise ValueError(f"data.path: class {missing[0]!r} has no training images after the split")
    mean, std = channel_stats(x_tr)
    transform = None
    if augment:
        black = tuple(-m / s for m, s in zip(mean, std))
        transform = RandomCropFlip(padding=max(1, x_tr.shape[2] // 8), flip_prob=0.5, fill=black)
    return DatasetBundle(
        name="imagefolder",
        train=ArrayDataset(normalize(x_tr, mean, std), torch.from_numpy(np.asarray(y_tr))),
        test=ArrayDataset(normalize(x_te, mean, std), torch.from_numpy(np.asarray(y_te))),
        num_classes=len(classes),
        input_shape=tuple(int(v) for v in x_tr.shape[1:]),
        class_names=classes,
        train_transform=transform,
        info={
            "source": str(source),
            "normalization": {"mean": list(mean), "std": list(std)},
            "image_size": [int(x_tr.shape[2]), int(x_tr.shape[3])],
            "channels": c,
        },
    )


__all__ = ["IMAGE_SUFFIXES", "channel_stats", "imagefolder", "list_images", "normalize", "read_imagefolder"]
