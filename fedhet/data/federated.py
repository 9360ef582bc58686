"""A centralized dataset split over clients: what the simulation hands to each client.

:func:`federate` optionally takes a seeded subset of the training set, partitions it with a
registered partitioner, and splits each client's part into a local training split and a held-out
split with the same label distribution (for personalized evaluation). The global test set is kept
whole. Every draw comes from a generator derived from ``seed`` and a key naming the step, so the
same arguments give the same clients.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import torch

from fedhet.core.registry import PARTITIONERS
from fedhet.core.rng import numpy_rng
from fedhet.data._checks import fail, fraction, integer
from fedhet.data.base import ArrayDataset, Transform
from fedhet.data.datasets import DatasetBundle
from fedhet.data.tasks import Task


class ClientSplits(Sequence[ArrayDataset]):
    """Every client's split of one kind (training or held out), each made when it is asked for:
    ``make(cid)`` builds client ``cid``'s examples, so memory holds only the clients in use, however
    many are registered. ``sizes`` (examples per client) and ``label_counts`` (examples per label,
    one row per client) are known without making any split. ``make`` must be picklable (the
    parallel and Ray executors send the dataset to their workers) and deterministic: the same
    ``cid`` gives the same examples every time, in every process."""

    def __init__(self, sizes: np.ndarray, label_counts: np.ndarray, make: Callable[[int], ArrayDataset]) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.label_counts = np.asarray(label_counts, dtype=np.int64)
        if self.label_counts.shape[0] != len(self.sizes):
            raise ValueError(f"ClientSplits: {len(self.sizes)} sizes but {self.label_counts.shape[0]} label-count rows")
        self.make = make

    def __len__(self) -> int:
        return len(self.sizes)

    @overload
    def __getitem__(self, cid: int) -> ArrayDataset: ...
    @overload
    def __getitem__(self, cid: slice) -> list[ArrayDataset]: ...
    def __getitem__(self, cid: int | slice) -> ArrayDataset | list[ArrayDataset]:
        if isinstance(cid, slice):
            return [self[c] for c in range(*cid.indices(len(self)))]
        cid = int(cid)
        if cid < 0:
            cid += len(self)
        if not 0 <= cid < len(self):
            raise IndexError(f"client {cid} of {len(self)}")
        data = self.make(cid)
        if len(data) != self.sizes[cid]:
            raise RuntimeError(f"ClientSplits: client {cid} was made with {len(data)} examples, its size says {self.sizes[cid]}")
        return data

    def __iter__(self) -> Iterator[ArrayDataset]:
        return (self[c] for c in range(len(self)))


def split_sizes(splits: Sequence[ArrayDataset]) -> tuple[int, ...]:
    """Examples per client, without making the splits of a :class:`ClientSplits`."""
    if isinstance(splits, ClientSplits):
        return tuple(int(n) for n in splits.sizes)
    return tuple(len(d) for d in splits)


@dataclass(frozen=True)
class FederatedDataset:
    """Per-client train and held-out splits plus the global test set. The splits are lists, or
    :class:`ClientSplits` that make each client's examples when asked (a natively federated
    dataset such as ``synthetic_clients``)."""

    name: str
    clients_train: Sequence[ArrayDataset]
    clients_test: Sequence[ArrayDataset]  # each client's held-out split, same label distribution as its train split
    test: ArrayDataset  # the global test set
    num_classes: int
    input_shape: tuple[int, ...]
    train_transform: Transform | None
    model_options: Mapping[str, Any] = field(default_factory=dict)
    #: each client's true group (0: as loaded; 1: images rotated, see ``federate``'s
    #: ``rotate_fraction``); empty means every client is in group 0
    client_groups: tuple[int, ...] = ()
    #: the dataset's class names (label ``i`` is ``class_names[i]``); empty when unnamed
    class_names: tuple[str, ...] = ()
    #: what the loader computed from the data (``DatasetBundle.info``: normalization statistics, source)
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.clients_train) != len(self.clients_test):
            raise ValueError(
                f"FederatedDataset: {len(self.clients_train)} client train splits but "
                f"{len(self.clients_test)} client test splits"
            )
        if not self.client_groups:
            object.__setattr__(self, "client_groups", (0,) * len(self.clients_train))
        else:
            object.__setattr__(self, "client_groups", tuple(int(g) for g in self.client_groups))
        if len(self.client_groups) != len(self.clients_train):
            raise ValueError(
                f"FederatedDataset: {len(self.client_groups)} client groups for {len(self.clients_train)} clients"
            )

    @property
    def num_clients(self) -> int:
        return len(self.clients_train)

    def pooled_train(self) -> ArrayDataset:
        """Every client's training split concatenated (built once; no augmentation)."""
        pooled = self.__dict__.get("_pooled")
        if pooled is None:
            parts = [d for d in self.clients_train if len(d)]
            pooled = ArrayDataset(torch.cat([d.x for d in parts]), torch.cat([d.y for d in parts]), self.task)
            self.__dict__["_pooled"] = pooled
        return pooled

    @property
    def task(self) -> Task:
        return self.test.task

    def label_counts(self, cid: int) -> tuple[int, ...]:
        """How many training examples of each class client ``cid`` holds (length ``num_classes``);
        for regression and tagging, of each stratum (score bin, entity-type set)."""
        if isinstance(self.clients_train, ClientSplits):
            return tuple(int(v) for v in self.clients_train.label_counts[cid])
        data = self.clients_train[cid]
        strata = data.task.strata(data.y)
        if data.task.kind == "classification":
            return tuple(int(v) for v in np.bincount(strata, minlength=self.num_classes)[: self.num_classes])
        n = max(int(self.task.strata(self.test.y).max(initial=0)), int(strata.max(initial=0))) + 1
        return tuple(int(v) for v in np.bincount(strata, minlength=n))

    def description(self) -> dict[str, Any]:
        """What a run records about its data (``dataset.json``): name, classes, input shape, the
        loader's ``info`` and the clients' sizes."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "input_shape": list(self.input_shape),
            "num_clients": self.num_clients,
            "train_examples": list(split_sizes(self.clients_train)),
            "held_out_examples": list(split_sizes(self.clients_test)),
            "test_examples": len(self.test),
            "info": dict(self.info),
        }

    def summary(self, max_clients: int = 10) -> str:
        """A few lines: sizes and classes per client (min / median / max) and, for the first
        ``max_clients`` clients, their training label histograms."""
        counts = [self.label_counts(c) for c in range(self.num_clients)]
        sizes = [sum(c) for c in counts]
        classes = [sum(1 for v in c if v) for c in counts]
        held_out = sum(split_sizes(self.clients_test))

        def spread(values: list[int]) -> str:
            return f"min {min(values)} / median {float(np.median(values)):g} / max {max(values)}"

        named = f" ({', '.join(self.class_names)})" if self.class_names and len(self.class_names) <= 20 else ""
        lines = [
            f"{self.name}: {self.num_clients} clients, {self.num_classes} classes{named}, input shape {self.input_shape}",
            f"train examples per client: {spread(sizes)} (total {sum(sizes)}; held out on clients: {held_out})",
            f"classes per client: {spread(classes)}",
            f"global test examples: {len(self.test)}",
        ]
        shown = min(self.num_clients, max_clients)
        order = f" in class order {', '.join(self.class_names)}" if self.class_names and self.num_classes <= 20 else ""
        lines.append(f"train label counts (first {shown} of {self.num_clients} clients){order}:")
        width = len(str(self.num_clients - 1))
        for cid in range(shown):
            if self.num_classes <= 20:
                hist = " ".join(str(v) for v in counts[cid])
            else:  # many classes: only the ones present, as class:count
                hist = " ".join(f"{c}:{v}" for c, v in enumerate(counts[cid]) if v)
            lines.append(f"  client {cid:>{width}}: {hist}")
        return "\n".join(lines)


def _index(idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))


def stratified_split(
    labels: np.ndarray, fraction_held_out: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Positions into ``labels`` split into (kept, held out): for each label with ``n`` examples,
    ``floor(fraction * n + 0.5)`` chosen at random are held out (halves round up). Both are sorted."""
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = int(math.floor(fraction_held_out * len(members) + 0.5))
        held.append(rng.choice(members, size=take, replace=False))
    held_out = np.sort(np.concatenate(held)) if held else np.empty(0, np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out, assume_unique=True)
    return kept.astype(np.int64), held_out.astype(np.int64)


def federate(
    bundle: DatasetBundle | Any,
    *,
    num_clients: int,
    partitioner: str = "iid",
    seed: int = 0,
    client_test_fraction: float = 0.2,
    train_subset: int | None = None,
    test_subset: int | None = None,
    rotate_fraction: float = 0.0,
    rotate_degrees: int = 180,
    **partitioner_options: Any,
) -> FederatedDataset:
    """Split ``bundle.train`` over ``num_clients`` clients (a natively federated dataset, one that
    is not a :class:`DatasetBundle`, such as ``synthetic_clients``, splits itself: its
    ``federate`` gets these arguments).

    1. ``train_subset``: keep that many training examples, drawn without replacement (key
       ``"train_subset"``), before partitioning (e.g. 10,000 examples for 20 clients x 500).
    2. Partition with the registered ``partitioner`` and ``partitioner_options`` (key ``"partition"``).
    3. Split each client's part into train and held out, stratified by label (key
       ``("client_split", cid)``): see :func:`stratified_split`. ``client_test_fraction=0`` gives
       empty held-out splits that keep the example shape.
    4. ``test_subset``: evaluate global models on that many test examples, a split stratified by
       label (key ``"test_subset"``), to make frequent evaluation affordable.
    5. ``rotate_fraction``: ``⌈rotate_fraction · num_clients⌉`` clients drawn at random (key
       ``"rotate"``) get their training and held-out images rotated by ``rotate_degrees`` (90, 180
       or 270, counter-clockwise, ``torch.rot90`` over the last two dimensions): the rotated
       clusters of IFCA and CFL. Images only (examples shaped (C, H, W); 90 and 270 need H = W).
       The global test set is left as it is. ``client_groups`` records who was rotated (1) and who
       was not (0).

    "Label" means the task's strata (:meth:`fedhet.data.tasks.Task.strata`): the class for
    classification, a score bin for regression, the entity-type set of a sentence for tagging. The
    ``natural`` partitioner splits by the dataset's ``groups`` instead (ValueError if it has none).
    """
    num_clients = integer("num_clients", num_clients, minimum=1)
    if not isinstance(bundle, DatasetBundle):  # natively federated: it splits itself over the clients
        return bundle.federate(
            num_clients=num_clients,
            partitioner=partitioner,
            seed=seed,
            client_test_fraction=client_test_fraction,
            train_subset=train_subset,
            test_subset=test_subset,
            rotate_fraction=rotate_fraction,
            **partitioner_options,
        )
    n_total = len(bundle.train)
    client_test_fraction = fraction("client_test_fraction", client_test_fraction, allow_zero=True)
    rotate_fraction, quarter_turns = _rotation(bundle, rotate_fraction, rotate_degrees)
    if partitioner not in PARTITIONERS:
        raise fail("partitioner", partitioner, ", ".join(PARTITIONERS.names()))

    labels = bundle.train.task.strata(bundle.train.y)
    if train_subset is None:
        pool = np.arange(n_total, dtype=np.int64)
    else:
        train_subset = integer("train_subset", train_subset, minimum=num_clients, maximum=n_total)
        pool = np.sort(numpy_rng(seed, "train_subset").choice(n_total, size=train_subset, replace=False))
    if num_clients > len(pool):
        raise fail("num_clients", num_clients, f"<= the number of training examples ({len(pool)})")

    partition = PARTITIONERS.get(partitioner)
    if partitioner == "natural":
        if bundle.groups is None:
            raise fail("partitioner", partitioner, f"a partitioner other than 'natural': dataset {bundle.name!r} has no natural groups")
        keys = np.asarray(bundle.groups)[pool]
    else:
        keys = labels[pool]
    parts = partition(keys, num_clients, numpy_rng(seed, "partition"), **partitioner_options)
    _check_parts(parts, num_clients, len(pool), partitioner)

    clients_train, clients_test = [], []
    for cid, part in enumerate(parts):
        members = pool[np.asarray(part, dtype=np.int64)]
        kept, held_out = stratified_split(labels[members], client_test_fraction, numpy_rng(seed, "client_split", cid))
        clients_train.append(bundle.train.subset(_index(members[kept])))
        clients_test.append(bundle.train.subset(_index(members[held_out])))
    groups = [0] * num_clients
    if rotate_fraction > 0:
        # the tiny slack keeps e.g. 0.3 * 10 (3.0000000000000004) at 3
        rotated = numpy_rng(seed, "rotate").choice(num_clients, size=math.ceil(rotate_fraction * num_clients - 1e-9), replace=False)
        for cid in sorted(int(c) for c in rotated):
            groups[cid] = 1
            clients_train[cid] = rotate_images(clients_train[cid], quarter_turns)
            clients_test[cid] = rotate_images(clients_test[cid], quarter_turns)
    test = bundle.test if test_subset is None else stratified_test_subset(bundle.test, test_subset, seed)
    return FederatedDataset(
        name=bundle.name,
        clients_train=clients_train,
        clients_test=clients_test,
        test=test,
        num_classes=bundle.num_classes,
        input_shape=tuple(bundle.input_shape),
        train_transform=bundle.train_transform,
        model_options=dict(bundle.model_options),
        client_groups=tuple(groups),
        class_names=tuple(bundle.class_names),
        info=dict(bundle.info),
    )


def stratified_test_subset(test: ArrayDataset, size: Any, seed: int) -> ArrayDataset:
    """A seeded subset of ``size`` examples of the global test set, stratified by label (key
    ``"test_subset"``); the whole set when ``size`` is its size."""
    size = integer("test_subset", size, minimum=1, maximum=len(test))
    if size == len(test):
        return test
    keep, _ = stratified_split(test.task.strata(test.y), 1 - size / len(test), numpy_rng(seed, "test_subset"))
    return test.subset(_index(np.sort(keep)))


#: the rotations ``federate`` allows, in degrees
ROTATIONS = (90, 180, 270)


def rotate_images(data: ArrayDataset, quarter_turns: int) -> ArrayDataset:
    """``data`` with every image turned ``quarter_turns`` times 90° counter-clockwise (last two dims)."""
    return ArrayDataset(torch.rot90(data.x, k=quarter_turns, dims=(-2, -1)).contiguous(), data.y, data.task)


def _rotation(bundle: DatasetBundle, rotate_fraction: Any, rotate_degrees: Any) -> tuple[float, int]:
    """Checked ``rotate_fraction`` (0 <= f <= 1) and ``rotate_degrees`` as quarter turns."""
    if isinstance(rotate_fraction, bool) or not isinstance(rotate_fraction, numbers.Real) or not 0.0 <= float(rotate_fraction) <= 1.0:
        raise fail("rotate_fraction", rotate_fraction, "0 <= value <= 1")
    if isinstance(rotate_degrees, bool) or not isinstance(rotate_degrees, numbers.Integral) or int(rotate_degrees) not in ROTATIONS:
        raise fail("rotate_degrees", rotate_degrees, ", ".join(str(r) for r in ROTATIONS))
    shape = tuple(bundle.input_shape)
    if rotate_fraction > 0:
        if len(shape) != 3 or bundle.train.x.dim() != 4:
            raise fail(
                "rotate_fraction",
                rotate_fraction,
                f"0 for dataset {bundle.name!r}: rotation needs images, examples shaped (C, H, W), and its examples have shape {shape}",
            )
        if rotate_degrees != 180 and shape[1] != shape[2]:
            raise fail("rotate_degrees", rotate_degrees, f"180 for dataset {bundle.name!r}: its images are {shape[1]}x{shape[2]}, not square")
    return float(rotate_fraction), int(rotate_degrees) // 90


def _check_parts(parts: list[np.ndarray], num_clients: int, n: int, partitioner: str) -> None:
    """A partitioner's output must be ``num_clients`` disjoint index arrays into the pool."""
    if len(parts) != num_clients:
        raise RuntimeError(f"partitioner {partitioner!r} returned {len(parts)} parts for {num_clients} clients")
    flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if parts else np.empty(0, np.int64)
    if len(flat) and (flat.min() < 0 or flat.max() >= n):
        raise RuntimeError(f"partitioner {partitioner!r} returned indices outside [0, {n})")
    if len(np.unique(flat)) != len(flat):
        raise RuntimeError(f"partitioner {partitioner!r} gave one example to more than one client")
