"""Rates for `lb list --rate`, estimated as the kernel's IPVS estimator does.

Every 2 seconds the counters are sampled; the rate over the interval moves a smoothed
average a quarter of the way (ip_vs_est.c: `avg += (rate - avg) >> 2`). Pure: the caller
passes the time and the totals.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from lb.stats import Totals

INTERVAL = 2.0


@dataclass(frozen=True, slots=True)
class Rates:
    cps: float = 0.0  # connections per second
    in_pps: float = 0.0
    out_pps: float = 0.0
    in_bps: float = 0.0  # bytes per second
    out_bps: float = 0.0


class RateEstimator:
    def __init__(self) -> None:
        self._last: dict[Hashable, tuple[float, Totals]] = {}
        self._rates: dict[Hashable, Rates] = {}

    def sample(self, key: Hashable, now: float, totals: Totals) -> None:
        prev = self._last.get(key)
        self._last[key] = (now, totals)
        if prev is None:
            return
        then, old = prev
        dt = now - then
        if dt <= 0:
            return
        avg = self._rates.get(key, Rates())

        def smooth(current: float, new: int, before: int) -> float:
            return current + ((new - before) / dt - current) / 4

        self._rates[key] = Rates(
            smooth(avg.cps, totals.conns, old.conns),
            smooth(avg.in_pps, totals.packets_in, old.packets_in),
            smooth(avg.out_pps, totals.packets_out, old.packets_out),
            smooth(avg.in_bps, totals.bytes_in, old.bytes_in),
            smooth(avg.out_bps, totals.bytes_out, old.bytes_out),
        )

    def get(self, key: Hashable) -> Rates:
        return self._rates.get(key, Rates())

    def forget_except(self, keys: set[Hashable]) -> None:
        for k in list(self._last):
            if k not in keys:
                self._last.pop(k, None)
                self._rates.pop(k, None)
