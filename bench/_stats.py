"""Percentiles the benchmarks print (one definition for all of them)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def pct(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values`` (0 < q < 1), one of the values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def p50(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def p95(values: Sequence[float]) -> float:
    """The 95th percentile, interpolated (the median of fewer than two values)."""
    if len(values) < 2:
        return p50(values)
    return statistics.quantiles(values, n=20, method="inclusive")[18]
