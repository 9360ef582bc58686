"""Centralized datasets, registered in ``fedhet.core.registry.DATASETS`` under their names.

A loader is ``load(*, root=None, seed=0, **options) -> DatasetBundle``. It returns the whole training
and test sets in memory; :func:`fedhet.data.federated.federate` then splits the training set over
clients. Unknown options raise a TypeError naming the option; bad values raise a ValueError naming
the field (``data.<option>``), the value and what is allowed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedhet.core.registry import DATASETS
from fedhet.core.rng import derive_seed, numpy_rng
from fedhet.data import _cifar10
from fedhet.data._checks import fail, fraction, integer, reject_unknown
from fedhet.data.base import ArrayDataset, Transform
from fedhet.data.transforms import RandomCropFlip

#: Per-channel statistics of the official CIFAR-10 training pixels in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = _cifar10.CLASSES


@dataclass(frozen=True)
class DatasetBundle:
    """A centralized dataset: train and test splits plus what a model and a trainer need to know."""

    name: str
    train: ArrayDataset  # x float32 (N, C, H, W) for images or (N, F) for tabular data; y int64
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]  # shape of one example, e.g. (1, 8, 8) or (3, 32, 32)
    class_names: tuple[str, ...]
    train_transform: Transform | None = None  # training-time augmentation, (x, generator) -> x
    #: options any model needs for this data (e.g. a text vocabulary's ``vocab_size`` and whether
    #: outputs are per ``sequence`` or per ``token``); a run's model options override them
    model_options: Mapping[str, Any] = field(default_factory=dict)
    #: natural grouping of the training examples (e.g. the source document), one int per example:
    #: what the ``natural`` partitioner splits by; ``None`` when the data has none
    groups: np.ndarray | None = None
    #: what the loader learnt from the data that a reader of the run needs (normalization statistics
    #: computed from the training split, the source, the image size); a run saves it as ``dataset.json``
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            data: ArrayDataset = getattr(self, split)
            if tuple(data.x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"DatasetBundle {self.name!r}: {split} examples have shape {tuple(data.x.shape[1:])}, "
                    f"input_shape says {tuple(self.input_shape)}"
                )
        if self.train.task != self.test.task:
            raise ValueError(f"DatasetBundle {self.name!r}: train and test splits pose different tasks")
        if self.groups is not None and len(self.groups) != len(self.train):
            raise ValueError(f"DatasetBundle {self.name!r}: {len(self.groups)} groups for {len(self.train)} training examples")
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"DatasetBundle {self.name!r}: {len(self.class_names)} class names for {self.num_classes} classes"
            )


def load_dataset(name: str, *, root: str | None = None, seed: int = 0, **options: Any) -> DatasetBundle:
    """Load the registered dataset ``name`` (ValueError listing the registered names if unknown)."""
    try:
        loader = DATASETS.get(name)
    except KeyError:
        raise fail("name", name, ", ".join(DATASETS.names())) from None
    return loader(root=root, seed=seed, **options)


def _split_seed(seed: int, name: str) -> int:
    # scikit-learn's random_state takes a 32-bit seed.
    return derive_seed(seed, name, "split") % (2**32)


def _dataset(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
    x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return ArrayDataset(x_t, torch.from_numpy(y.astype(np.int64)))


# ------------------------------------------------------------------------------------- digits


@DATASETS.register("digits")
def digits(*, root: str | None = None, seed: int = 0, test_fraction: float = 0.2, **unknown: Any) -> DatasetBundle:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; nothing downloaded).

    Pixels are scaled to [0, 1] (``/16``), shaped (N, 1, 8, 8), then standardized with the mean and
    standard deviation of the training pixels. The train/test split is stratified by label and
    seeded from ``seed``. ``root`` is accepted and ignored.

    Options:
        test_fraction: share of the images held out as the test split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    reject_unknown("dataset 'digits'", unknown, ["root", "seed", "test_fraction"])
    test_fraction = fraction("test_fraction", test_fraction, allow_zero=False)
    features, labels = load_digits(return_X_y=True)
    x = (features / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, labels, test_size=test_fraction, stratify=labels, random_state=_split_seed(seed, "digits")
    )
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return DatasetBundle(
        name="digits",
        train=_dataset((x_tr - mean) / std, y_tr),
        test=_dataset((x_te - mean) / std, y_te),
        num_classes=10,
        input_shape=(1, 8, 8),
        class_names=tuple(str(d) for d in range(10)),
    )


# ------------------------------------------------------------------------------------- synthetic


#: the most numbers a synthetic dataset holds (num_samples * num_features): 8 GB while it is drawn
SYNTHETIC_MAX_VALUES = 10**9


@DATASETS.register("synthetic")
def synthetic(
    *,
    root: str | None = None,
    seed: int = 0,
    num_samples: int = 1000,
    num_features: int = 20,
    num_classes: int = 4,
    test_fraction: float = 0.2,
    noise: float = 1.0,
    **unknown: Any,
) -> DatasetBundle:
    """A Gaussian mixture: one centre per class drawn from N(0, I), examples = centre + noise * N(0, I).

    Classes are balanced (example i has label ``i % num_classes`` before shuffling) and the split is
    stratified, so a linear model learns it well for ``noise`` around 1. Everything is drawn from
    generators derived from ``seed``. ``root`` is accepted and ignored.

    Options:
        num_samples: examples in all.
        num_features: dimensions of an example.
        num_classes: classes (one centre each).
        test_fraction: share of the examples held out as the test split.
        noise: standard deviation of the noise around each centre.
    """
    from sklearn.model_selection import train_test_split

    reject_unknown(
        "dataset 'synthetic'",
        unknown,
        ["root", "seed", "num_samples", "num_features", "num_classes", "test_fraction", "noise"],
    )
    num_classes = integer("num_classes", num_classes, minimum=2)
    num_features = integer("num_features", num_features, minimum=1)
    test_fraction = fraction("test_fraction", test_fraction, allow_zero=False)
    # Stratified splitting needs at least one example of every class on each side.
    need = max(2 * num_classes, int(np.ceil(num_classes / min(test_fraction, 1 - test_fraction))))
    num_samples = integer("num_samples", num_samples, minimum=need)
    if num_samples * num_features > SYNTHETIC_MAX_VALUES:
        raise fail("num_samples", num_samples, f"num_samples * num_features <= {SYNTHETIC_MAX_VALUES:.0e} (num_features is {num_features})")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= float(noise) < float("inf"):
        raise fail("noise", noise, ">= 0")

    rng = numpy_rng(seed, "synthetic")
    centres = rng.normal(size=(num_classes, num_features))
    labels = rng.permutation(np.arange(num_samples) % num_classes)
    x = centres[labels] + float(noise) * rng.normal(size=(num_samples, num_features))
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, labels, test_size=test_fraction, stratify=labels, random_state=_split_seed(seed, "synthetic")
    )
    return DatasetBundle(
        name="synthetic",
        train=_dataset(x_tr, y_tr),
        test=_dataset(x_te, y_te),
        num_classes=num_classes,
        input_shape=(num_features,),
        class_names=tuple(f"class_{c}" for c in range(num_classes)),
    )


# ------------------------------------------------------------------------------------- cifar10


def cifar10_arrays(
    split: str, *, root: str | os.PathLike[str] | None = None, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 split as raw arrays ``(x uint8 (N, 3, 32, 32), y int64 (N,))``, decoded once and
    cached (see :mod:`fedhet.data._cifar10` for the accepted layouts and the cache)."""
    return _cifar10.read_split(_cifar10.locate(root, allow_download=download), split)


def normalize_cifar10(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 ``(x / 255 - mean) / std`` per channel, CIFAR-10's statistics."""
    from fedhet.data._imagefolder import normalize

    return normalize(x, CIFAR10_MEAN, CIFAR10_STD)


@DATASETS.register("cifar10")
def cifar10(
    *, root: str | None = None, seed: int = 0, augment: bool = False, download: bool = True, **unknown: Any
) -> DatasetBundle:
    """CIFAR-10 (50,000 train / 10,000 test 32x32 RGB images, 10 classes), normalized per channel
    with the standard mean and std.

    ``root`` is the folder searched (else ``$FEDHET_DATA``, else ``~/.cache/fedhet/data``); when it
    holds no copy and ``download`` is true the official tarball is downloaded there and md5-checked.
    ``augment=True`` sets ``train_transform`` to a random 32x32 crop of the image padded by 4 pixels
    plus a random horizontal flip. The padding is black (pixel value 0 before normalization, as when
    padding raw images), i.e. ``-mean / std`` per channel in the normalized tensor. The examples keep
    the source's order, so ``seed`` is accepted and unused.

    Options:
        augment: random 32x32 crops of the image padded by 4 pixels, and horizontal flips, in training.
        download: download the official tarball (md5-checked) when no copy is found.
    """
    reject_unknown("dataset 'cifar10'", unknown, ["root", "seed", "augment", "download"])
    if not isinstance(augment, bool):
        raise fail("augment", augment, "true or false")
    if not isinstance(download, bool):
        raise fail("download", download, "true or false")
    source = _cifar10.locate(root, allow_download=download)
    splits = {}
    for split in _cifar10.SPLITS:
        x, y = _cifar10.read_split(source, split)
        splits[split] = ArrayDataset(normalize_cifar10(x), torch.from_numpy(y))
    transform = None
    if augment:
        black = tuple(-m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD))
        transform = RandomCropFlip(padding=4, flip_prob=0.5, fill=black)
    return DatasetBundle(
        name="cifar10",
        train=splits["train"],
        test=splits["test"],
        num_classes=10,
        input_shape=(3, 32, 32),
        class_names=CIFAR10_CLASSES,
        train_transform=transform,
    )
