"""Datasets, partitioners and the per-client split that the simulation hands to clients.

Importing this package registers the built-in datasets (``digits``, ``synthetic``, ``synthetic_clients``, ``cifar10``,
``imagefolder``, ``tabular``, ``textfile``, and the text tasks ``sst2``, ``mrpc``, ``stsb``, ``ade_ner``) in ``DATASETS`` and the partitioners
(``iid``, ``dirichlet``, ``shards``, ``natural``) in ``PARTITIONERS``. Every dataset's examples carry
their task (:mod:`fedhet.data.tasks`): the loss they train with and the metrics they are scored by.
"""

from fedhet.data import _ade, _glue, _imagefolder, _synthetic_clients, _tabular, _textfile, datasets, partition  # noqa: F401  (importing registers the entries)
from fedhet.data.base import ArrayDataset, Transform
from fedhet.data.datasets import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DatasetBundle,
    cifar10_arrays,
    load_dataset,
)
from fedhet.data.federated import ClientSplits, FederatedDataset, federate, stratified_split
from fedhet.data.transforms import RandomCropFlip

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "ArrayDataset",
    "ClientSplits",
    "DatasetBundle",
    "FederatedDataset",
    "RandomCropFlip",
    "Transform",
    "cifar10_arrays",
    "federate",
    "load_dataset",
    "stratified_split",
]
