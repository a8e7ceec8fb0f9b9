"""Schedulers with the same picks as Linux IPVS, given the same history of edits.

`SCHEDULERS` is the one table of them: every other part of lb (the config's checks, the
userspace dataplane, the kernel dataplanes' "can it be offloaded") reads what a scheduler
is and can do from its entry here. Adding a scheduler: docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from lb.model import SchedFlag, SchedulerName
from lb.sched.base import Request, Scheduler, Target
from lb.sched.dest import Dest, fold_address
from lb.sched.fo import WeightedFailover
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


@dataclass(frozen=True, slots=True)
class SchedulerSpec:
    """One scheduler: how to make it, what the config may ask of it, where it can run."""

    name: SchedulerName
    make: Callable[[Target], Scheduler]  # bound to a service (ip_vs_bind_scheduler)
    #: The flags it takes, by the spellings ipvsadm accepts (`-b sh-port`); none: no flags.
    flags: Mapping[str, SchedFlag] = field(default_factory=dict)
    max_backends: int | None = None  # the most destinations the kernel lets it hold
    hashes_client: bool = False  # its picks hash the client address (it needs it folded)
    ipvs: bool = True  # the kernel has it (module ip_vs_<name>): the IPVS dataplane can carry it
    #: offload/nft_rules.py renders its picks as a `numgen` or `jhash` rule: the nftables
    #: dataplane can carry it (its flags: see nft_rules.not_expressible_nft).
    nftables: bool = False


def _flags(name: SchedulerName) -> dict[str, SchedFlag]:
    return {f"{name}-{flag}": flag for flag in SchedFlag}


SCHEDULERS: dict[SchedulerName, SchedulerSpec] = {
    s.name: s
    for s in (
        SchedulerSpec(SchedulerName.RR, RoundRobin, nftables=True),
        SchedulerSpec(SchedulerName.WRR, WeightedRoundRobin, nftables=True),
        SchedulerSpec(SchedulerName.LC, LeastConnection),
        SchedulerSpec(SchedulerName.WLC, WeightedLeastConnection),
        SchedulerSpec(SchedulerName.SED, ShortestExpectedDelay),
        SchedulerSpec(SchedulerName.NQ, NeverQueue),
        SchedulerSpec(
            SchedulerName.SH,
            SourceHash,
            flags=_flags(SchedulerName.SH),
            hashes_client=True,
            nftables=True,
        ),
        SchedulerSpec(
            SchedulerName.MH,
            Maglev,
            flags=_flags(SchedulerName.MH),
            max_backends=Maglev.MAX_DESTS,
            hashes_client=True,
        ),
        SchedulerSpec(SchedulerName.DH, DestinationHash),
        # nftables: the `numgen` cycle nft_rules computes from this scheduler's own picks
        # is the one backend of highest weight, every slot; overload, which nftables
        # cannot see, needs thresholds, which keep a service out of nftables anyway.
        SchedulerSpec(SchedulerName.FO, WeightedFailover, nftables=True),
    )
}


def make_scheduler(name: SchedulerName, target: Target) -> Scheduler:
    """Bind a scheduler to a service (ip_vs_bind_scheduler + init_service)."""
    return SCHEDULERS[name].make(target)


def with_flags() -> list[SchedulerName]:
    """The schedulers that take flags, in the table's order."""
    return [s.name for s in SCHEDULERS.values() if s.flags]


__all__ = [
    "SCHEDULERS",
    "Dest",
    "Request",
    "Scheduler",
    "SchedulerSpec",
    "Target",
    "fold_address",
    "make_scheduler",
    "with_flags",
]
