"""Benchmarks: `python -m bench.<name>` runs one and prints its figures."""
