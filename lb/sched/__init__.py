"""Schedulers with the same picks as Linux IPVS, given the same history of edits."""

from __future__ import annotations

from lb.model import SchedulerName
from lb.sched.base import Request, Scheduler, Target
from lb.sched.dest import Dest, fold_address
from lb.sched.hashing import DestinationHash, SourceHash
from lb.sched.leastconn import (
    LeastConnection,
    NeverQueue,
    ShortestExpectedDelay,
    WeightedLeastConnection,
)
from lb.sched.mh import Maglev
from lb.sched.rr import RoundRobin
from lb.sched.wrr import WeightedRoundRobin

SCHEDULERS: dict[SchedulerName, type[Scheduler]] = {
    SchedulerName.RR: RoundRobin,
    SchedulerName.WRR: WeightedRoundRobin,
    SchedulerName.LC: LeastConnection,
    SchedulerName.WLC: WeightedLeastConnection,
    SchedulerName.SED: ShortestExpectedDelay,
    SchedulerName.NQ: NeverQueue,
    SchedulerName.SH: SourceHash,
    SchedulerName.MH: Maglev,
    SchedulerName.DH: DestinationHash,
}

#: Schedulers whose picks hash the client address (they need it folded).
HASHES_CLIENT = frozenset({SchedulerName.SH, SchedulerName.MH})


def make_scheduler(name: SchedulerName, target: Target) -> Scheduler:
    """Bind a scheduler to a service (ip_vs_bind_scheduler + init_service)."""
    return SCHEDULERS[name](target)


__all__ = [
    "HASHES_CLIENT",
    "SCHEDULERS",
    "Dest",
    "Request",
    "Scheduler",
    "Target",
    "fold_address",
    "make_scheduler",
]
