"""The IPVS dataplane: make the kernel's virtual services match a desired set.

Work is that of the change, as in kube-proxy's proxiers: `apply(desired, changes)` writes
only the services `changes` names (their destinations read before and after, one service's
dump each), and never dumps the kernel's service table. A full reconcile (dump,
diff, write the difference) runs on the first apply, after one that failed or surprised
it, and every RESYNC_PERIOD from `refresh()` (longer at scale: RESYNC_DUTY): that one
repairs drift (an `ipvsadm -D` of an lb service, a destination added by hand) and says
so (`ipvs.drift_repaired`). Destination edits come from `lb.plan` (the userspace
reference's order, so the kernel's list order and scheduler state match it). Only
services on a VIP of lb's own device are touched; any other (keepalived's, say) is left
alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from typing import Protocol as TypingProtocol

from lb.changes import Changes
from lb.log import emit
from lb.model import Endpoint, IPAddress, IPNetwork, Protocol, Service, ServiceKey
from lb.persist import Affinity
from lb.plan import AddDest, DelDest, EditDest, plan_dests
from lb.stats import BackendSnapshot, ErrorReason, ServiceSnapshot, Totals
from lb.virtual_service import DestView
from offload.host import HostError, nat_paths
from offload.ipvs_model import FWD_LOCAL, KConn, KDest, KService, KStats
from offload.ipvs_netlink import IpvsClient, carries_data, read_conn_table, read_templates
from offload.nft_rules import NatPath, PathCounts
from offload.policy import kernel_service, not_expressible_ipvs

log = logging.getLogger("lb.offload")

NO_ERRORS: dict[ErrorReason, int] = dict.fromkeys(ErrorReason, 0)

#: How often `refresh()` reconciles the whole kernel against what lb applied (kube-proxy's
#: syncPeriod): the bound on how long drift lasts...
RESYNC_PERIOD = 30.0
#: ... or this many times as long as the last resync took, if longer: a resync dumps every
#: service's destinations (10,000 dumps at 10,000 services), and must not keep an idle lb
#: busy (at most 0.5% of a core).
RESYNC_DUTY = 200.0
#: A service's destinations are read again while its counters moved this recently: its
#: connections' entries still change state and expire with no packet (TCP's FIN_WAIT and
#: TIME_WAIT last 2 minutes, an idle UDP entry 5).
STIRRED = 330.0

Hold = Callable[[ServiceKey], AbstractAsyncContextManager[None]]
Nat = Callable[[set[NatPath]], Awaitable[None]]


class Filters(TypingProtocol):
    """Drops new connections from clients outside a service's `allowed_sources`, before
    IPVS sees them (offload/host.py, `Host.set_filters`)."""

    async def __call__(
        self, sources: Mapping[ServiceKey, Iterable[IPNetwork]], *, whole: bool = False
    ) -> None: ...


class Injector(TypingProtocol):
    """Creates persistence templates in IPVS (offload/ipvs_sync.py)."""

    async def inject(self, key: ServiceKey, templates: Sequence[Affinity]) -> int:
        """How many of `templates` the kernel holds afterwards."""
        ...


@asynccontextmanager
async def _no_hold(key: ServiceKey) -> AsyncIterator[None]:
    yield


def _totals(s: KStats) -> Totals:
    return Totals(
        conns=s.conns,
        bytes_in=s.inbytes,
        bytes_out=s.outbytes,
        packets_in=s.inpkts,
        packets_out=s.outpkts,
        errors=dict(NO_ERRORS),
    )


class IpvsDataplane:
    name = "ipvs"
    lingers = True  # deleting an IPVS service resets its connections

    def __init__(
        self,
        client: IpvsClient,
        owned_vips: Callable[[], Awaitable[set[IPAddress]]],
        drain_timeout: float = 300.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        conn_table: Callable[[], list[KConn] | None] = read_conn_table,
        template_table: Callable[[], list[KConn] | None] = read_templates,
        hold: Hold = _no_hold,
        nat: Nat | None = None,
        filters: Filters | None = None,
        injector: Injector | None = None,
    ) -> None:
        self.client = client
        #: IPVS cannot filter clients: a service with `allowed_sources` is carried only
        #: with a filter in front of it (the host's nftables table)
        self.filters = filters
        #: IPVS takes templates only through its sync protocol (offload/ipvs_sync.py):
        #: carried when lb can run the sync daemon here.
        self.injector = injector
        self.carries_affinity = injector is not None
        self.hold = hold
        self.nat = nat
        self.conn_table = conn_table
        self.template_table = template_table
        self._conns: list[KConn] | None = None
        self.owned_vips = owned_vips
        self.drain_timeout = drain_timeout
        self.clock = clock
        self._netlink = asyncio.Lock()  # apply and refresh share the netlink client
        self.foreign: set[ServiceKey] = set()  # IPVS services on these keys that are not ours
        self._desired: dict[ServiceKey, Service] = {}
        self._services: dict[ServiceKey, KService] = {}
        self._dests: dict[ServiceKey, list[KDest]] = {}
        self._quiesced: dict[tuple[ServiceKey, Endpoint], float] = {}
        self._stirred: dict[ServiceKey, float] = {}  # when each one's counters last moved
        #: destinations a reconcile read and left as they were, for the refresh ending it
        self._just_read: dict[ServiceKey, list[KDest]] = {}
        self._vips: set[IPAddress] = set()  # lb's device's addresses, as last read
        self._paths: dict[ServiceKey, set[NatPath]] = {}  # each service's masquerade paths
        self._path_count = PathCounts()  # how many services need each
        self._reconciled = False  # a full reconcile went through, and nothing failed since
        self._resynced_at = 0.0
        self.resync_every = RESYNC_PERIOD  # longer while resyncs are long (RESYNC_DUTY)

    # --- apply ---------------------------------------------------------------------------

    async def export_affinity(self, key: ServiceKey) -> list[Affinity]:
        """The service's persistence templates as /proc/net/ip_vs_conn lists them (client
        network, port 0), for userspace taking the service back."""
        return [
            Affinity(t.client.ip, t.dest, float(t.expires))
            for t in self.template_table() or []
            if t.vip == key.listen and t.protocol is key.protocol and t.expires > 0
        ]

    async def apply(
        self,
        desired: list[Service],
        changes: Changes,
        seeds: Mapping[ServiceKey, list[Affinity]] | None = None,
    ) -> None:
        """Write the change (`changes`: the services of `desired` that are new or changed,
        and the keys that left), or reconcile everything (see the module's docstring)."""
        async with self._netlink:
            seeds = seeds or {}
            try:
                if not self._reconciled:
                    await self._reconcile(desired, seeds=seeds)
                elif changes:
                    try:
                        await self._apply_changes(changes, seeds)
                    except Exception as e:  # a surprise (a service that exists already...)
                        emit(
                            log,
                            logging.WARNING,
                            "ipvs.resync",
                            f"IPVS apply of the change failed ({type(e).__name__}: {e}): "
                            "reconciling every service",
                        )
                        await self._reconcile(desired, seeds=seeds)
            except BaseException:
                self._reconciled = False  # what the kernel has is unknown: look next time
                raise

    async def _apply_changes(
        self, changes: Changes, seeds: Mapping[ServiceKey, list[Affinity]]
    ) -> None:
        """Only the services `changes` names: no dump of the kernel's table."""
        now = self.clock()
        for key in changes.removed:
            if self._desired.pop(key, None) is not None and key not in self.foreign:
                await self._delete(key)
        fresh = [s for s in changes.fresh if s.key not in self.foreign]
        if any(s.listen.ip not in self._vips for s in fresh):
            self._vips = await self.owned_vips()  # a new VIP: is it on lb's device?
        # the filters first: IPVS never takes a connection of a service without its filter
        await self._filter(
            {s.key: s.allowed_sources if s.listen.ip in self._vips else () for s in fresh}
        )
        for s in fresh:
            if s.listen.ip not in self._vips:  # not lb's to program
                self._desired.pop(s.key, None)
                self._forget(s.key)
                continue
            self._desired[s.key] = s
            have = self._services.get(s.key)
            # its destinations read now, not as last refreshed: whether a destination that
            # leaves is deleted or quiesced depends on the connections it has this moment
            written = await self._apply_service(s, have, now, seeds.get(s.key, ()))
            if written or s.key not in self._dests:
                self._dests[s.key] = await self.client.dests(s.key)  # read back: this one
            want = kernel_service(s)  # as written now; the counters as last read
            self._services[s.key] = want if have is None else replace(want, stats=have.stats)
        gone = {key for key in changes.removed if key not in self._desired}
        if gone:
            self._quiesced = {k: t for k, t in self._quiesced.items() if k[0] not in gone}
            await self._filter(dict.fromkeys(gone, ()))  # once their IPVS services went
        self._just_read.clear()  # a refresh reads them again, later
        await self._set_nat_of(changes.touched())

    async def _reconcile(
        self,
        desired: list[Service],
        periodic: bool = False,
        seeds: Mapping[ServiceKey, list[Affinity]] | None = None,
    ) -> None:
        """Dump the kernel, diff every service against `desired`, write the difference.
        `periodic`: a resync of what was applied, where any write is drift repaired."""
        now = self.clock()
        self._just_read.clear()
        vips = self._vips = await self.owned_vips()
        kernel = {k.key: k for k in await self.client.services()}
        self.foreign = {key for key in kernel if key.listen.ip not in vips}
        wanted: dict[ServiceKey, Service] = {}
        drifted: list[str] = []
        # the filters first (those of the services deleted below go after them)
        await self._filter({s.key: s.allowed_sources for s in desired if s.key not in self.foreign})
        for s in desired:
            if s.key in self.foreign:
                continue  # never modify a service that is not ours
            wanted[s.key] = s
            have = kernel.get(s.key)
            if periodic and have != kernel_service(s):
                drifted.append(f"{s.key} {'missing' if have is None else 'changed'}")
            moved = await self._apply_service(s, have, now, (seeds or {}).get(s.key, ()))
            if periodic and moved and have is not None:
                drifted.append(f"{s.key} destinations")
        for key in kernel.keys() - wanted.keys() - self.foreign:
            if periodic:
                drifted.append(f"{key} not lb's to keep")
            await self._delete(key)
        self._desired = wanted
        await self._filter({key: s.allowed_sources for key, s in wanted.items()}, whole=True)
        self._quiesced = {k: t for k, t in self._quiesced.items() if k[0] in wanted}
        self._paths = {key: nat_paths([s]) for key, s in wanted.items()}
        self._path_count.clear()
        for paths in self._paths.values():
            self._path_count.add(paths, set())
        await self._set_nat()
        await self._refresh()
        self._reconciled = True
        self._resynced_at = now
        if drifted:
            emit(
                log,
                logging.WARNING,
                "ipvs.drift_repaired",
                f"IPVS no longer had what lb applied: repaired {', '.join(drifted[:10])}"
                + (f" and {len(drifted) - 10} more" if len(drifted) > 10 else ""),
                services=len(drifted),
            )

    async def _delete(self, key: ServiceKey) -> None:
        await self.client.del_service(key)
        self._forget(key)
        emit(
            log,
            logging.INFO,
            "ipvs.service_deleted",
            f"IPVS service {key} deleted",
            service=str(key),
        )

    def _forget(self, key: ServiceKey) -> None:
        self._services.pop(key, None)
        self._dests.pop(key, None)

    def not_expressible(self, s: Service) -> str | None:
        reason = not_expressible_ipvs(s)
        if reason is None and s.allowed_sources and self.filters is None:
            return "allowed_sources need nft on the host (IPVS cannot filter clients itself)"
        return reason

    async def _filter(
        self, sources: Mapping[ServiceKey, Iterable[IPNetwork]], whole: bool = False
    ) -> None:
        """The filters of these services' `allowed_sources` (`Filters`; the host writes
        only those that changed). A refusal raises: the service must not reach IPVS."""
        if self.filters is not None and (sources or whole):
            await self.filters(sources, whole=whole)

    async def owned(self) -> set[ServiceKey]:
        vips = await self.owned_vips()
        return {k.key for k in await self.client.services() if k.key.listen.ip in vips}

    async def _set_nat_of(self, keys: Iterable[ServiceKey]) -> None:
        """The masquerade paths of these services changed, maybe: update the counts, and
        the host's table only if the set of paths did (a weight edit leaves it alone)."""
        moved: set[NatPath] = set()
        for key in keys:
            s = self._desired.get(key)
            new = nat_paths([s]) if s is not None else set()
            old = self._paths.pop(key, set())
            if new:
                self._paths[key] = new
            self._path_count.remove(old - new, moved)
            self._path_count.add(new - old, moved)
        if moved:
            await self._set_nat()

    async def _set_nat(self) -> None:
        """Masquerade for clients on this host and hairpin (offload/host.py)."""
        if self.nat is None:
            return
        try:
            await self.nat(set(self._path_count))
        except HostError as e:
            emit(
                log,
                logging.WARNING,
                "offload.nat",
                f"masquerade for local clients unavailable: {e}",
            )

    async def _apply_service(
        self, s: Service, have: KService | None, now: float, seeds: Sequence[Affinity] = ()
    ) -> bool:
        """Make the kernel's service `s`: whether its destinations were written. Between
        adding a service and its first destination, and while its scheduler is swapped,
        IPVS refuses new connections (port unreachable): those moments are held (new
        connections dropped, so clients send their SYN again) until the service works.
        `seeds`: persistence templates to create once its real servers exist, in the same
        hold, so that no new connection of those clients is scheduled before."""
        want = kernel_service(s)
        if have is None or seeds:

            async def create() -> None:
                if have is None:
                    await self.client.add_service(want)
                    await self._apply_dests(s, [], now)
                else:
                    if have != want:
                        await self.client.set_service(want)
                    await self._apply_dests(s, await self.client.dests(s.key), now)
                if seeds:
                    await self._seed(s, seeds)

            held_ms = await self._held(s.key, create)
            emit(
                log,
                logging.INFO,
                "ipvs.service_added" if have is None else "ipvs.service_taken_over",
                f"IPVS service {s.key} ({s.name}) "
                + ("added" if have is None else "takes its clients' templates"),
                service=s.name,
                key=str(s.key),
                held_ms=held_ms,
            )
            return True
        if have.scheduler != want.scheduler:
            held_ms = await self._held(s.key, lambda: self.client.set_service(want))
            emit(
                log,
                logging.INFO,
                "ipvs.scheduler_changed",
                f"IPVS service {s.key} ({s.name}) now schedules with {want.scheduler}",
                service=s.name,
                key=str(s.key),
                scheduler=want.scheduler,
                held_ms=held_ms,
            )
        elif have != want:
            await self.client.set_service(want)
        current = await self.client.dests(s.key)
        written = await self._apply_dests(s, current, now)
        if not written:
            self._just_read[s.key] = current  # for the refresh that ends a reconcile
        return written

    async def _seed(self, s: Service, seeds: Sequence[Affinity]) -> None:
        """Create the service's persistence templates (`seeds`) through the injector;
        what the kernel would not take is said, never skipped silently."""
        if self.injector is None:
            return
        try:
            taken = await self.injector.inject(s.key, seeds)
        except Exception as e:  # the daemon refused (another runs?), a send failed
            taken, why = 0, f" ({type(e).__name__}: {e})"
        else:
            why = ""
        level = logging.INFO if taken == len(seeds) else logging.WARNING
        emit(
            log,
            level,
            "ipvs.affinity_seeded",
            f"IPVS service {s.key} ({s.name}): {taken} of {len(seeds)} persistence "
            f"templates created{why}",
            service=s.name,
            templates=taken,
            wanted=len(seeds),
        )

    async def _held(self, key: ServiceKey, write: Callable[[], Awaitable[None]]) -> float:
        """Run `write` with new connections to `key` held; how long they were, in ms."""
        start = self.clock()
        async with self.hold(key):
            await write()
        return round((self.clock() - start) * 1000, 1)

    async def _apply_dests(self, s: Service, current: list[KDest], now: float) -> bool:
        """Bring the destinations in line with the service; whether anything was written."""
        local = s.listen

        def may_delete(view: DestView) -> bool:
            if view.conns == 0:
                return True
            since = self._quiesced.setdefault((s.key, view.endpoint), now)
            return now - since >= self.drain_timeout

        views = [
            DestView(d.endpoint, d.weight, d.u_threshold, d.l_threshold, d.active + d.inactive)
            for d in current
        ]
        ops = plan_dests(views, s.backends, may_delete)
        for op in ops:
            if isinstance(op, AddDest):
                self._quiesced.pop((s.key, op.endpoint), None)
                fwd = FWD_LOCAL if op.endpoint == local else 0
                await self.client.add_dest(
                    s.key, KDest(op.endpoint, op.weight, op.u_threshold, op.l_threshold, fwd)
                )
            elif isinstance(op, EditDest):
                fwd = FWD_LOCAL if op.endpoint == local else 0
                await self.client.set_dest(
                    s.key, KDest(op.endpoint, op.weight, op.u_threshold, op.l_threshold, fwd)
                )
            elif isinstance(op, DelDest):
                self._quiesced.pop((s.key, op.endpoint), None)
                await self.client.del_dest(s.key, op.endpoint)
        return bool(ops)

    # --- observation ---------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read counters and connections; never in the middle of an apply (one netlink
        client: their requests and answers must not interleave)."""
        async with self._netlink:
            start = self.clock()
            if self._reconciled and start - self._resynced_at >= self.resync_every:
                try:
                    await self._reconcile(list(self._desired.values()), periodic=True)
                except BaseException:
                    self._reconciled = False
                    raise
                self.resync_every = max(RESYNC_PERIOD, RESYNC_DUTY * (self.clock() - start))
            else:
                await self._refresh()
            await self._settle()

    async def _settle(self) -> None:
        """Delete the quiesced destinations whose connections are gone (or that waited
        out the drain timeout): IPVS tells nobody when that happens, so each refresh looks
        again at the services that have some (and only at those)."""
        now = self.clock()
        for key in {key for key, _ in self._quiesced}:
            s = self._desired.get(key)
            written = (
                s is not None
                and key in self._dests
                and (await self._apply_dests(s, self._dests[key], now))
            )
            if written:  # read back what the kernel now has
                self._dests[key] = await self.client.dests(key)

    async def _refresh(self) -> None:
        """Re-read counters and connection counts: one dump of the services (with their
        counters), then a dump of the destinations of each service that may have moved:
        new, its counters moved, or they moved within STIRRED (its connections' counts
        may still change as they expire, with no packet), or it has quiesced
        destinations. An idle service costs nothing past the first dump (10,000 services:
        one dump a refresh, not 10,001)."""
        now = self.clock()
        services = {k.key: k for k in await self.client.services()}
        before = self._services
        self._services = {k: v for k, v in services.items() if k in self._desired}
        quiesced = {key for key, _ in self._quiesced}
        dests: dict[ServiceKey, list[KDest]] = {}
        just_read, self._just_read = self._just_read, {}
        for key, svc in self._services.items():
            old = before.get(key)
            if (old.stats if old is not None else KStats()) != svc.stats:
                self._stirred[key] = now
            if key in just_read:  # by the reconcile this refresh ends, nothing written since
                dests[key] = just_read[key]
            elif (
                key not in self._dests
                or now - self._stirred.get(key, -STIRRED) < STIRRED
                or key in quiesced
            ):
                dests[key] = await self.client.dests(key)
            else:
                dests[key] = self._dests[key]
        self._dests = dests
        self._stirred = {k: t for k, t in self._stirred.items() if k in self._services}
        self._conns = self.conn_table()

    def dests(self, key: ServiceKey) -> list[KDest]:
        return self._dests.get(key, [])

    def drained(self, key: ServiceKey, keep: Endpoint | None = None) -> bool:
        """No connection that can still carry data on the service's NAT destinations
        (`keep`: the local one, if any). Closed TCP connections in TIME_WAIT and UDP entries
        idle for a while do not count; without the connection table, every entry does."""
        if self._conns is None:
            return all(d.active + d.inactive == 0 for d in self.dests(key) if d.endpoint != keep)
        return not any(
            c.vip == key.listen
            and c.protocol is key.protocol
            and c.dest != keep
            and carries_data(c)
            for c in self._conns
        )

    def has(self, key: ServiceKey) -> bool:
        return key in self._services

    def active(self) -> list[ServiceSnapshot]:
        """Every service: a refresh reads them all anyway."""
        return self.observe()

    def observe(self, only: ServiceKey | None = None) -> list[ServiceSnapshot]:
        out = []
        services: Iterable[tuple[ServiceKey, KService]]
        if only is None:
            services = self._services.items()
        else:
            services = [(only, self._services[only])] if only in self._services else []
        for key, k in services:
            s = self._desired[key]
            wanted = {b.address: b for b in s.backends}
            backends = tuple(
                BackendSnapshot(
                    address=d.endpoint,
                    backend=wanted.get(d.endpoint),
                    weight=d.weight,
                    active=d.active,
                    inactive=d.inactive,
                    persistent=d.persistent,
                    overloaded=False,
                    totals=_totals(d.stats),
                )
                for d in self._dests.get(key, [])
            )
            out.append(
                ServiceSnapshot(
                    service=s,
                    dataplane=self.name,
                    listening=True,
                    open=sum(d.active for d in self._dests.get(key, [])),
                    totals=_totals(k.stats),
                    backends=backends,
                )
            )
        return out

    def fastpath_note(self) -> str:
        return (
            "no flowtable: IPVS's NAT flows cannot take one "
            "(docs/dataplanes/nftables.md#why-ipvss-flows-take-no-flowtable)"
        )

    async def remove_all(self) -> None:
        """Delete every service this dataplane owns (shutdown, `lb cleanup`)."""
        vips = await self.owned_vips()
        for k in await self.client.services():
            if k.key.listen.ip in vips:
                await self.client.del_service(k.key)
        with contextlib.suppress(HostError):  # else the table goes with Host.remove()
            await self._filter({}, whole=True)
        self._desired.clear()
        self._services.clear()
        self._dests.clear()
        self._paths.clear()
        self._path_count.clear()
        self._reconciled = False


def save_lines(s: Service) -> list[str]:
    """The service as `ipvsadm-save -n` would print it once offloaded (backends in the
    order they are added, the file's)."""
    k = kernel_service(s)
    proto = "-t" if s.protocol is Protocol.TCP else "-u"
    head = f"-A {proto} {s.listen} -s {k.scheduler}"
    if s.flags:
        head += " -b " + ",".join(f"{s.scheduler}-{f}" for f in sorted(s.flags))
    if s.persistence is not None:
        head += f" -p {s.persistence.timeout}"
        if s.persistence.prefix_len != s.listen.ip.max_prefixlen:
            head += f" -M {ipaddress.IPv4Network(f'0.0.0.0/{s.persistence.prefix_len}').netmask}"
    lines = [head]
    for b in s.backends:
        line = f"-a {proto} {s.listen} -r {b.address} -m -w {b.effective_weight}"
        if b.max_connections:
            line += f" -x {b.max_connections}"
        if b.resume_below:
            line += f" -y {b.resume_below}"
        lines.append(line)
    return lines
