"""Client selection: ``ClientSelector(init, select, update)`` with explicit, checkpointed state."""

from fedhet.selection.base import ClientSelector, Uniform

__all__ = ["ClientSelector", "Uniform"]
