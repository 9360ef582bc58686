"""The one local-training loop and its loss terms."""

from fedhet.training.local import LocalTraining, TrainStats, evaluate, train

__all__ = ["LocalTraining", "TrainStats", "evaluate", "train"]
