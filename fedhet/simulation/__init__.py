"""The round loop and the executors that run client work."""
