"""A virtual service as the IPVS core keeps it (`struct ip_vs_service`), with no I/O.

It owns the destination list in kernel order (newest first), the bound scheduler, the
persistence templates and the connection accounting. Edits are the ipvsadm verbs
(add / edit / delete a destination, edit the service) and call the scheduler hooks the
kernel calls; `connect()` is ip_vs_schedule(): pick a destination (through a template if
the service is persistent) and count the new connection on it.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Collection
from dataclasses import dataclass

from lb.model import Endpoint, Persistence, Protocol, SchedFlag, SchedulerName
from lb.persist import Affinity, Template, Templates
from lb.sched import SCHEDULERS, Dest, Request, fold_address, make_scheduler
from lb.sched.base import NO_EXCLUDE

#: How long a closed TCP connection still counts as inactive: the IPVS TIME_WAIT timeout,
#: and the CLOSE timeout for a connection that ended with a reset.
TIME_WAIT = 120.0
CLOSE = 10.0


class Conn:
    """What one scheduled connection holds on to."""

    __slots__ = ("active", "dest", "template")

    def __init__(self, dest: Dest, template: Template | None, active: bool) -> None:
        self.dest = dest
        self.template = template
        self.active = active


@dataclass(frozen=True, slots=True)
class DestView:
    """A destination as a reconciler sees it (the same fields a kernel dump gives)."""

    endpoint: Endpoint
    weight: int
    u_threshold: int
    l_threshold: int
    conns: int  # active + inactive


class VirtualService:
    def __init__(
        self,
        protocol: Protocol,
        vip: Endpoint,
        scheduler: SchedulerName,
        flags: frozenset[SchedFlag] = frozenset(),
        persistence: Persistence | None = None,
    ) -> None:
        self.protocol = protocol
        self.vip = vip
        self.vip_fold = fold_address(vip.ip.packed)
        self.dests: list[Dest] = []
        self._by_endpoint: dict[Endpoint, Dest] = {}
        self._trash: dict[Endpoint, Dest] = {}  # deleted dests whose connections live on
        self.flags = flags
        self.scheduler_name = scheduler
        self.sched = make_scheduler(scheduler, self)
        self._hashes_client = SCHEDULERS[scheduler].hashes_client
        self.persistence = persistence
        bits = 32 if vip.ip.version == 4 else 128
        self.templates = Templates(
            persistence.timeout if persistence else 0,
            persistence.prefix_len if persistence else bits,
            bits,
        )
        self._next_expiry = math.inf

    # --- edits (ipvsadm -a / -e / -d / -E) -------------------------------------------------

    def find(self, endpoint: Endpoint) -> Dest | None:
        return self._by_endpoint.get(endpoint)

    def add_dest(
        self, endpoint: Endpoint, weight: int, u_threshold: int = 0, l_threshold: int = 0
    ) -> Dest:
        if endpoint in self._by_endpoint:
            raise ValueError(f"destination {endpoint} already exists")
        # ip_vs_add_dest() takes a recently deleted dest back from the trash, counters and all.
        dest = self._trash.pop(endpoint, None) or Dest(endpoint)
        dest.update(weight, u_threshold, l_threshold, adding=True)
        self.dests.insert(0, dest)
        self._by_endpoint[endpoint] = dest
        self.sched.add_dest(dest)
        return dest

    def edit_dest(
        self, endpoint: Endpoint, weight: int, u_threshold: int = 0, l_threshold: int = 0
    ) -> Dest:
        dest = self._by_endpoint[endpoint]
        dest.update(weight, u_threshold, l_threshold, adding=False)
        self.sched.upd_dest(dest)
        return dest

    def del_dest(self, endpoint: Endpoint) -> None:
        dest = self._by_endpoint.pop(endpoint)
        index = self.dests.index(dest)
        del self.dests[index]
        dest.available = False
        self.sched.del_dest(dest, index)
        if dest.total:
            self._trash[endpoint] = dest

    def edit_service(
        self, scheduler: SchedulerName, flags: frozenset[SchedFlag], persistence: Persistence | None
    ) -> None:
        """ip_vs_edit_service(): a new scheduler starts fresh on the current list; templates
        stay (they expire on their own), new ones use the new timeout and netmask."""
        if scheduler != self.scheduler_name:
            self.scheduler_name = scheduler
            self.sched = make_scheduler(scheduler, self)
            self._hashes_client = SCHEDULERS[scheduler].hashes_client
        self.flags = flags
        self.persistence = persistence
        if persistence is not None:
            bits = 32 if self.vip.ip.version == 4 else 128
            fresh = Templates(persistence.timeout, persistence.prefix_len, bits)
            self.templates.timeout, self.templates.mask = fresh.timeout, fresh.mask

    @property
    def needs_client_address(self) -> bool:
        """Whether connect() looks at the client address (persistence or a hashing scheduler)."""
        return self.persistence is not None or self._hashes_client

    def known_endpoints(self) -> set[Endpoint]:
        """Destinations in the list, and deleted ones whose connections are still counted."""
        return set(self._by_endpoint) | set(self._trash)

    def idle(self) -> bool:
        """Nothing counted and nothing timed: no connection (open or lingering), no
        template, no deleted destination still holding some. Housekeeping can skip it."""
        return not self._trash and not len(self.templates) and all(d.total == 0 for d in self.dests)

    def at_limit(self) -> bool:
        """Whether a refusal is down to connection limits: a backend that would take
        connections by weight is overloaded."""
        return any(d.overloaded and d.weight > 0 for d in self.dests)

    def views(self, now: float) -> list[DestView]:
        self.expire(now)
        return [
            DestView(d.endpoint, d.weight, d.u_threshold, d.l_threshold, d.total)
            for d in self.dests
        ]

    # --- connections -------------------------------------------------------------------

    def connect(
        self, client_ip: bytes, client_port: int, now: float, exclude: Collection[Dest] = NO_EXCLUDE
    ) -> Conn | None:
        """Schedule a new connection from client_ip (packed) and count it; None = refuse."""
        if now >= self._next_expiry:
            self.expire(now)
        template: Template | None = None
        if self.persistence is not None:
            key = self.templates.key(int.from_bytes(client_ip, "big"))
            template = self.templates.lookup(key, now)
            if template is None or not template.valid() or template.dest in exclude:
                dest = self.sched.schedule(Request(fold_address(client_ip), client_port, exclude))
                if dest is None:
                    return None
                template = self.templates.create(key, dest, now)
            else:
                dest = template.dest
            self.templates.attach(template, now)
        else:
            fold = fold_address(client_ip) if self._hashes_client else 0
            dest = self.sched.schedule(Request(fold, client_port, exclude))
            if dest is None:
                return None
        active = self.protocol is Protocol.TCP
        dest.bind(active)
        return Conn(dest, template, active)

    def close(self, conn: Conn, now: float, *, reset: bool = False) -> None:
        """An established TCP connection ended: it lingers as inactive (TIME_WAIT / CLOSE)."""
        linger = CLOSE if reset else TIME_WAIT
        conn.dest.deactivate(now, linger)
        self._next_expiry = min(self._next_expiry, now + linger)
        if conn.template is not None:
            self.templates.detach(conn.template, now, linger)

    def release(self, conn: Conn, now: float) -> None:
        """A connection entry is gone at once: a failed TCP connect, an expired UDP flow."""
        conn.dest.unbind(conn.active)
        if conn.template is not None:
            self.templates.detach(conn.template, now, 0.0)
        if conn.dest.total == 0 and self._trash.get(conn.dest.endpoint) is conn.dest:
            del self._trash[conn.dest.endpoint]

    # --- persistence across dataplanes ----------------------------------------------------

    def export_affinity(self, now: float) -> list[Affinity]:
        """The live, valid templates, for the dataplane that takes the service over (an
        invalid one would be replaced at the client's next connection anyway)."""
        version = self.vip.ip.version
        return [
            Affinity(
                ipaddress.IPv4Address(t.key) if version == 4 else ipaddress.IPv6Address(t.key),
                t.dest.endpoint,
                t.expires - now,
            )
            for t in self.templates.live(now)
            if t.valid()
        ]

    def seed_affinity(self, affinities: list[Affinity], now: float) -> int:
        """Take over another dataplane's templates (see Templates.seed); how many were
        taken (one whose backend this service does not have is left out)."""
        if self.persistence is None:
            return 0
        taken = 0
        for a in affinities:
            dest = self._by_endpoint.get(a.backend)
            if dest is None or a.remaining <= 0 or a.client.version != self.vip.ip.version:
                continue
            key = self.templates.key(int(a.client))
            if self.templates.seed(key, dest, a.remaining, now) is not None:
                taken += 1
        return taken

    def expire(self, now: float) -> None:
        """Run the timers due by `now`: lingering connections and persistence templates."""
        nxt = math.inf
        for pool in (self.dests, list(self._trash.values())):
            for d in pool:
                d.expire(now)
                e = d.next_expiry()
                if e is not None and e < nxt:
                    nxt = e
        for endpoint, d in list(self._trash.items()):
            if d.total == 0:
                del self._trash[endpoint]
        self._next_expiry = nxt
        self.templates.sweep(now)
