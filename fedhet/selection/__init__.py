"""Client selection: ``ClientSelector(init, select, update)`` with explicit, checkpointed state.

- :class:`Uniform`: ``clients_per_round`` (or ``fraction``) of the eligible clients, uniformly.
- :class:`PowerOfChoice`: the highest-loss clients among candidates sampled by data size
  (``pow-d``, ``cpow-d``, ``rpow-d``).
- :class:`DivFL`: a diverse subset by greedy facility location on the clients' gradients.

Every selector sees only the clients eligible and available in the round.
"""

from fedhet.selection.base import ClientSelector, Probe, Uniform
from fedhet.selection.divfl import DivFL, facility_location
from fedhet.selection.poc import PowerOfChoice

__all__ = ["ClientSelector", "DivFL", "PowerOfChoice", "Probe", "Uniform", "facility_location"]
