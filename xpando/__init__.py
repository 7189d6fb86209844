"""xpando: a network of AI experts run as durable Temporal workflows."""

__version__ = "0.1.0"
