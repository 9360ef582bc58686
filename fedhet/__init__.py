"""fedhet: federated learning over heterogeneous devices."""

__version__ = "0.1.0"
