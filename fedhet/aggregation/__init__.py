"""Aggregation rules as accumulators: clients are folded in one at a time, and partial accumulators
from different workers merge, so a worker can return one partial sum for all the clients it ran."""

from fedhet.aggregation.base import Accumulator, Collect
from fedhet.aggregation.mean import WeightedSum, weighted_mean

__all__ = ["Accumulator", "Collect", "WeightedSum", "weighted_mean"]
