"""What every scheduler sees: the service's destination list, in kernel order, and a client.

Schedulers mirror the IPVS modules in `net/netfilter/ipvs/ip_vs_*.c`: each gets the same
hooks the kernel calls (init, add_dest, upd_dest, del_dest) and must keep the same state,
so that the same history of edits yields the same sequence of picks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import ClassVar, Protocol

from lb.model import SchedFlag
from lb.sched.dest import Dest

NO_EXCLUDE: frozenset[Dest] = frozenset()


class Target(Protocol):
    """The service a scheduler works for (the parts of `struct ip_vs_service` it reads)."""

    @property
    def dests(self) -> list[Dest]:
        """Destinations in kernel list order: the most recently added first."""

    @property
    def flags(self) -> frozenset[SchedFlag]: ...

    @property
    def vip_fold(self) -> int: ...


class Request:
    """The client of a new connection, as a scheduler sees it.

    `exclude` holds destinations this one connection already failed to reach; they count
    as overloaded for this pick only (connect retry), nothing else changes.
    """

    __slots__ = ("exclude", "src_fold", "src_port")

    def __init__(self, src_fold: int, src_port: int, exclude: Collection[Dest] = NO_EXCLUDE):
        self.src_fold = src_fold
        self.src_port = src_port
        self.exclude = exclude


class Scheduler:
    """Base: the kernel's hooks, no-ops unless a scheduler needs them."""

    name: ClassVar[str]

    def __init__(self, target: Target) -> None:
        self.target = target

    def add_dest(self, dest: Dest) -> None:
        """`dest` was just linked at the head of the list."""

    def upd_dest(self, dest: Dest) -> None:
        """`dest`'s weight or thresholds were edited in place."""

    def del_dest(self, dest: Dest, index: int) -> None:
        """`dest` was unlinked from position `index`."""

    def schedule(self, req: Request) -> Dest | None:
        raise NotImplementedError


class Recomputing(Scheduler):
    """A scheduler whose add, edit and delete hooks all recompute its state from the list."""

    def changed(self) -> None:
        raise NotImplementedError

    def add_dest(self, dest: Dest) -> None:
        self.changed()

    def upd_dest(self, dest: Dest) -> None:
        self.changed()

    def del_dest(self, dest: Dest, index: int) -> None:
        self.changed()


def blocked(dest: Dest, req: Request) -> bool:
    """IP_VS_DEST_F_OVERLOAD, widened by the request's exclusions."""
    return dest.overloaded or (bool(req.exclude) and dest in req.exclude)


def unavailable(dest: Dest, req: Request) -> bool:
    """The hashing schedulers' is_unavailable(): quiesced or overloaded."""
    return dest.weight <= 0 or blocked(dest, req)


def hashed_pick(
    first: Dest | None,
    req: Request,
    fallback: bool,
    probes: Callable[[], Iterable[Dest | None]],
) -> Dest | None:
    """sh and mh: the hashed destination if available; else, with the fallback flag, the
    first available one along the probe sequence, an empty entry ending the search."""
    if first is None:
        return None
    if not unavailable(first, req):
        return first
    if fallback:
        for d in probes():
            if d is None:
                return None
            if not unavailable(d, req):
                return d
    return None
