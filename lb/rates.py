"""Rates for `lb list --rate`, estimated as the kernel's IPVS estimator does.

Every 2 seconds the counters are sampled; the rate over the interval moves a smoothed
average a quarter of the way (ip_vs_est.c: `avg += (rate - avg) >> 2`).

Only services whose counters may have changed are sampled (the dataplanes say which:
`active()`), so an idle service costs nothing however many there are. That loses
nothing: over an interval in which a service was not sampled its counters did not move,
so the kernel's estimator would have fed it a rate of 0, which only decays the average by
3/4. Those decays are applied when the service is next sampled or read. Pure: the caller
passes the time and the snapshots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lb.model import Endpoint, ServiceKey
from lb.stats import RATED, Counters, ServiceSnapshot, Totals

INTERVAL = 2.0
DECAY = 0.75  # what an interval with no change leaves of the average
#: Rounds between two prunes of what dataplanes no longer carry (lb.daemon).
PRUNE_ROUNDS = 30


@dataclass(frozen=True, slots=True)
class Rates:
    cps: float = 0.0  # connections per second
    in_pps: float = 0.0
    out_pps: float = 0.0
    in_bps: float = 0.0  # bytes per second
    out_bps: float = 0.0

    def decayed(self, intervals: int) -> Rates:
        if intervals <= 0:
            return self
        f = DECAY**intervals
        return Rates(**{s.rate: getattr(self, s.rate) * f for s in RATED if s.rate})

    def moved(self, new: Marks, old: Marks, dt: float) -> Rates:
        def smooth(current: float, now: int, before: int) -> float:
            return current + ((now - before) / dt - current) / 4

        return Rates(
            **{
                s.rate: smooth(getattr(self, s.rate), now, before)
                for s, now, before in zip(RATED, new, old, strict=True)
                if s.rate
            }
        )


ZERO = Rates()

#: The rated counters of a Totals, in RATED's order: all the estimator keeps of them.
Marks = tuple[int, ...]
NOTHING: Marks = (0,) * len(RATED)


def marks(counted: Totals | Counters) -> Marks:
    return tuple(getattr(counted, s.attr) for s in RATED)


#: A service's own counters are filed under None, its backends' under their address.
Part = Endpoint | None


@dataclass(slots=True)
class _Entry:
    then: float  # when it was last sampled
    #: the marks of the parts whose counters are not all zero (a part left out counted
    #: nothing yet: 100,000 backends that never had a connection cost no memory here)
    marks: dict[Part, Marks]
    rates: dict[Part, Rates]


#: The tables of an entry that has none yet: shared (an entry's are replaced, never
#: written to), so that 10,000 idle services cost no two dicts each.
_NO_MARKS: dict[Part, Marks] = {}
_NO_RATES: dict[Part, Rates] = {}


class RateEstimator:
    def __init__(self) -> None:
        self._entries: dict[tuple[ServiceKey, str], _Entry] = {}
        self._round = 0.0  # the time of the latest sampling round

    def round(self, now: float, active: list[ServiceSnapshot]) -> None:
        """One sampling round: the snapshots of every service whose counters moved since
        the last round (others may be left out)."""
        self._round = now
        for snap in active:
            self._sample(snap, now)

    def _sample(self, snap: ServiceSnapshot, now: float) -> None:
        key = (snap.service.key, snap.dataplane)
        sampled: dict[Part, Marks] = {}
        for part, totals in ((None, snap.totals), *((b.address, b.totals) for b in snap.backends)):
            m = marks(totals)
            if m != NOTHING:
                sampled[part] = m
        entry = self._entries.get(key)
        if entry is None:  # first seen: the baseline
            self._entries[key] = _Entry(now, sampled or _NO_MARKS, _NO_RATES)
            return
        elapsed = now - entry.then
        if elapsed <= 0:
            return
        # the rounds it was left out of had no change: rate 0, the average decays
        missed = max(0, round(elapsed / INTERVAL) - 1)
        dt = max(elapsed - missed * INTERVAL, 1e-9)
        rates: dict[Part, Rates] = {}
        for part, new in sampled.items():
            old = entry.marks.get(part, NOTHING)
            if any(n < o for n, o in zip(new, old, strict=True)):
                old = NOTHING  # counters that went back began again (a service that left a
                # dataplane and came back before a prune): counted from zero, never negative
            rates[part] = entry.rates.get(part, ZERO).decayed(missed).moved(new, old, dt)
        entry.then, entry.marks, entry.rates = now, sampled, rates

    def _get(self, key: tuple[ServiceKey, str], part: Part) -> Rates:
        entry = self._entries.get(key)
        if entry is None:
            return ZERO
        missed = round((self._round - entry.then) / INTERVAL)
        return entry.rates.get(part, ZERO).decayed(missed)

    def service(self, key: ServiceKey, dataplane: str) -> Rates:
        return self._get((key, dataplane), None)

    def backend(self, key: ServiceKey, address: Endpoint, dataplane: str) -> Rates:
        return self._get((key, dataplane), address)

    def prune(self, known: Callable[[ServiceKey, str], bool]) -> None:
        """Forget the services a dataplane no longer has (work: the services sampled once)."""
        for key in [k for k in self._entries if not known(*k)]:
            del self._entries[key]
