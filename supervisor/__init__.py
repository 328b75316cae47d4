"""Lemonade Supervisor: the parent process that routes requests to per-model worker processes."""

__version__ = "0.1.0"
