"""Typed experiment config, checkpoints, logging sinks and reports."""
