"""``synthetic_clients``: a natively federated Gaussian mixture whose clients' examples are made on
demand, so that a population of hundreds of thousands of phones costs memory only for the clients
taking part in a round.

Every client draws its examples from the same class centres (one per class, drawn from N(0, I)),
shifted by a vector of its own (feature skew, ``shift``), with its own label shares (label skew: the
``iid`` partitioner gives every client the population's balanced shares, ``dirichlet`` draws each
client's shares from Dir(alpha)). What is fixed when the dataset is federated, for every client at
once and from one seeded stream each: its number of examples, its label counts and the stratified
split of those counts into training and held-out examples. A client's features (and the order of
its labels) are drawn only when its split is asked for, from a generator seeded by the run's seed and
the client id, so any process makes the same examples for the same client. The global test set is
drawn from the population: balanced labels, each example with a shift of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedhet.core.registry import DATASETS
from fedhet.core.rng import numpy_rng
from fedhet.data._checks import fail, fraction, integer, reject_unknown
from fedhet.data.base import ArrayDataset

#: the most label counts the population holds (clients x classes), 800 MB
MAX_COUNTS = 10**8
OPTIONS = ["root", "seed", "examples", "size_spread", "num_features", "num_classes", "noise", "shift", "test_examples"]


def _real(field: str, value: Any, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= float(value) < float("inf"):
        raise fail(field, value, f">= {minimum:g}")
    return float(value)


class SyntheticClients:
    """The population of ``synthetic_clients`` before it is split over clients (what the dataset
    loader returns; :func:`fedhet.data.federated.federate` calls :meth:`federate`)."""

    name = "synthetic_clients"

    def __init__(
        self,
        *,
        seed: int,
        examples: int,
        size_spread: float,
        num_features: int,
        num_classes: int,
        noise: float,
        shift: float,
        test_examples: int,
    ) -> None:
        self.seed = int(seed)
        self.examples = examples
        self.size_spread = size_spread
        self.num_features = num_features
        self.num_classes = num_classes
        self.noise = noise
        self.shift = shift
        self.test_examples = test_examples
        self.centres = numpy_rng(seed, self.name, "centres").normal(size=(num_classes, num_features))

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in OPTIONS[2:]}

    def draw(self, rng: np.random.Generator, labels: np.ndarray, shift: np.ndarray) -> ArrayDataset:
        """Examples of ``labels``: each label's centre plus ``shift`` (one vector, or one a row) plus noise."""
        x = self.centres[labels] + shift + self.noise * rng.normal(size=(len(labels), self.num_features))
        return ArrayDataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(labels.astype(np.int64)))

    def test_set(self) -> ArrayDataset:
        rng = numpy_rng(self.seed, self.name, "test")
        labels = rng.permutation(np.arange(self.test_examples) % self.num_classes)
        shifts = self.shift * rng.normal(size=(len(labels), self.num_features))
        return self.draw(rng, labels, shifts)

    def federate(
        self,
        *,
        num_clients: int,
        partitioner: str,
        seed: int,
        client_test_fraction: float,
        train_subset: int | None,
        test_subset: int | None,
        rotate_fraction: float,
        **partitioner_options: Any,
    ) -> Any:
        from fedhet.data.federated import ClientSplits, FederatedDataset, stratified_test_subset

        if int(seed) != self.seed:
            raise ValueError(f"{self.name}: loaded with seed {self.seed} but federated with seed {seed}")
        if train_subset is not None:
            raise fail(
                "train_subset", train_subset, f"unset: {self.name} makes each client's examples (data.options.examples)"
            )
        if rotate_fraction:
            raise fail("rotate_fraction", rotate_fraction, f"0: {self.name} is not an image dataset")
        if partitioner not in ("iid", "dirichlet"):
            raise fail(
                "partitioner", partitioner, f"iid or dirichlet ({self.name} draws each client's label shares itself)"
            )
        alpha = partitioner_options.pop("alpha", None)
        if partitioner_options:
            key = next(iter(partitioner_options))
            raise fail(
                key, partitioner_options[key], f"unset: {self.name} takes data.alpha (with partitioner dirichlet) only"
            )
        if partitioner == "dirichlet" and alpha is None:
            raise fail("alpha", alpha, "> 0 (the Dirichlet concentration is required)")
        if partitioner == "iid" and alpha is not None:
            raise fail("alpha", alpha, "unset with partitioner iid")
        if num_clients * self.num_classes > MAX_COUNTS:
            raise fail(
                "num_clients",
                num_clients,
                f"num_clients * num_classes <= {MAX_COUNTS:.0e} (num_classes is {self.num_classes})",
            )
        fraction("client_test_fraction", client_test_fraction, allow_zero=True)

        c = self.num_classes
        sizes = np.full(num_clients, self.examples, dtype=np.int64)
        if self.size_spread > 0:  # log-normal sizes around the same mean, at least 1
            z = numpy_rng(seed, self.name, "sizes").normal(size=num_clients)
            factor = np.exp(self.size_spread * z - self.size_spread**2 / 2)
            sizes = np.maximum(1, np.rint(self.examples * factor)).astype(np.int64)
        if partitioner == "dirichlet":
            shares = numpy_rng(seed, self.name, "shares").dirichlet(np.full(c, float(alpha)), size=num_clients)
        else:
            shares = np.full((num_clients, c), 1.0 / c)
        counts = numpy_rng(seed, self.name, "counts").multinomial(sizes, shares).astype(np.int64)
        held = np.floor(client_test_fraction * counts + 0.5).astype(np.int64)  # per label, as stratified_split
        maker = _ClientMaker(self, counts - held, held)
        test = self.test_set()
        if test_subset is not None:
            test = stratified_test_subset(test, test_subset, seed)
        return FederatedDataset(
            name=self.name,
            clients_train=ClientSplits(counts.sum(1) - held.sum(1), counts - held, maker.train),
            clients_test=ClientSplits(held.sum(1), held, maker.held_out),
            test=test,
            num_classes=c,
            input_shape=(self.num_features,),
            train_transform=None,
            class_names=tuple(f"class_{k}" for k in range(c)),
            info={
                "options": self.options(),
                "partitioner": partitioner,
                **({"alpha": alpha} if alpha is not None else {}),
            },
        )


class _ClientMaker:
    """Makes one client's training or held-out split (``ClientSplits.make``; picklable): its labels
    from the counts fixed for it, in an order and with features drawn from generators seeded by the
    run's seed, the split and the client id (its shift from one of its own)."""

    def __init__(self, source: SyntheticClients, train_counts: np.ndarray, held_counts: np.ndarray) -> None:
        self.source = source
        self.counts = {"train": train_counts, "held_out": held_counts}

    def _make(self, split: str, cid: int) -> ArrayDataset:
        src = self.source
        shift = (
            src.shift * numpy_rng(src.seed, src.name, "shift", cid).normal(size=src.num_features) if src.shift else 0.0
        )
        rng = numpy_rng(src.seed, src.name, split, cid)
        labels = rng.permutation(np.repeat(np.arange(src.num_classes), self.counts[split][cid]))
        return src.draw(rng, labels, shift)

    def train(self, cid: int) -> ArrayDataset:
        return self._make("train", cid)

    def held_out(self, cid: int) -> ArrayDataset:
        return self._make("held_out", cid)


@DATASETS.register("synthetic_clients")
def synthetic_clients(
    *,
    root: str | None = None,
    seed: int = 0,
    examples: int = 20,
    size_spread: float = 0.0,
    num_features: int = 20,
    num_classes: int = 4,
    noise: float = 1.0,
    shift: float = 0.0,
    test_examples: int = 2000,
    **unknown: Any,
) -> SyntheticClients:
    """A natively federated Gaussian mixture for cross-device populations: each client's examples
    are drawn when it takes part, so memory does not grow with the number of registered clients.

    Clients share the class centres (drawn from N(0, I)); a client's examples are its label's centre
    plus its own shift plus noise. ``data.partitioner`` sets the label shares: ``iid`` (balanced) or
    ``dirichlet`` (each client's shares from Dir(data.alpha)). ``data.client_test_fraction`` of each
    label's examples are held out, as with other datasets. ``root`` is accepted and ignored.

    Options:
        examples: examples a client holds (training and held out), on average.
        size_spread: spread of the clients' sizes: sizes are examples * exp(s z - s^2/2), z ~ N(0, 1),
            at least 1 (0: every client holds the same number).
        num_features: dimensions of an example.
        num_classes: classes (one centre each).
        noise: standard deviation of the noise around a centre.
        shift: standard deviation of each client's shift of every feature (feature skew; 0: none).
        test_examples: examples of the global test set, drawn from the whole population.
    """
    reject_unknown("dataset 'synthetic_clients'", unknown, OPTIONS)
    return SyntheticClients(
        seed=seed,
        examples=integer("examples", examples, minimum=1),
        size_spread=_real("size_spread", size_spread),
        num_features=integer("num_features", num_features, minimum=1),
        num_classes=integer("num_classes", num_classes, minimum=2),
        noise=_real("noise", noise),
        shift=_real("shift", shift),
        test_examples=integer("test_examples", test_examples, minimum=1),
    )
