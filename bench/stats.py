"""Medians and spreads of repeated measurements (no timing assertion anywhere: the bench
reports, it does not judge)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Summary:
    median: float
    low: float  # the smallest run
    high: float  # the largest run
    runs: int

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            raise ValueError("no measurement to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "low": self.low, "high": self.high, "runs": self.runs}


def ms(seconds: float) -> str:
    """A duration for a table: 3 significant digits, in ms."""
    value = seconds * 1000
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks, as
    numpy's default does; the tools' own percentiles are read from their output."""
    if not values:
        raise ValueError("no value to take a percentile of")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
