"""The nftables NAT dataplane: make lb's tables (`ip lb`, `ip lb_0`...) carry a set of services.

The first apply replaces the tables with empty ones in one atomic transaction (tables
left by a crashed run are adopted that way, and connections they had set up keep their
conntrack NAT), then adds the services in batches. Every later apply sends only the
objects of the services that changed (`offload.nft_rules.diff_ops`) as one transaction
over netlink (`offload/nft_netlink.py`): nothing is ever half applied, and the work is
that of the change. The per-backend counters (read every second) and the affinity sets'
sizes are netlink dumps on the same socket, in a thread: an idle lb spawns no `nft`.
Without a socket, all of it goes through the `nft` command. Other tables are never
touched.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import shutil
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from lb.changes import Changes
from lb.log import emit
from lb.model import BackendState, Endpoint, Protocol, Service, ServiceKey
from lb.persist import Affinity
from lb.stats import BackendSnapshot, ErrorReason, ServiceSnapshot, Totals
from offload.conntrack import Conntrack, ConntrackError, Flow
from offload.nft_netlink import NftNetlink, NftNetlinkError
from offload.nft_rules import (
    FLOWTABLE,
    TABLE,
    TOTAL,
    AddFlowtableDevices,
    AddMasq,
    DeleteMasq,
    FastPath,
    Names,
    NatPath,
    Op,
    PathCounts,
    Rendered,
    affinity_ops,
    base_script,
    diff_ops,
    probe_flowtable_script,
    remove_script,
    render,
    with_affinity,
)
from offload.policy import not_expressible_nftables

Nft = Callable[[str], Awaitable[str]]
Query = Callable[..., Awaitable[Any]]
CHUNK = 2000  # services per netlink batch when the table is built
TEMPLATES_PERIOD = 10.0  # seconds between two counts of the affinity sets' elements

log = logging.getLogger("lb.offload")

ALIVE = frozenset({BackendState.UP, BackendState.DRAIN})  # their flows go on
#: conntrack accounting, which `ct packets` (the flowtable's threshold) needs: per network
#: namespace, for the flows that start once it is on
CONNTRACK_ACCT = "/proc/sys/net/netfilter/nf_conntrack_acct"


def links() -> set[str]:
    """The network devices of this network namespace, by name."""
    return {name for _, name in socket.if_nameindex()}


def enable_acct(path: str = CONNTRACK_ACCT) -> None:
    with open(path, "r+") as f:
        if f.read().strip() != "1":
            f.seek(0)
            f.write("1\n")


class NftError(Exception):
    pass


async def _nft(args: list[str], stdin: str | None) -> str:
    if shutil.which("nft") is None:
        raise NftError("nft is not installed (Debian package nftables)")
    proc = await asyncio.create_subprocess_exec(
        "nft",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if proc.returncode != 0:
        raise NftError(err.decode(errors="replace").strip() or f"nft exited {proc.returncode}")
    return out.decode()


async def run_nft(script: str) -> str:
    """Run an nft script as one transaction (`nft -f -`): its output, or NftError."""
    return await _nft(["-f", "-"], script)


async def query_nft(*args: str) -> Any:
    """`nft -j ARGS`, parsed."""
    return json.loads(await _nft(["-j", *args], None))


def hairpin(services: Iterable[Service]) -> set[NatPath]:
    """A backend reaching itself through the VIP: its reply would not come back through
    the balancer without masquerade. (Clients on this host need none here: conntrack's own
    NAT undoes the DNAT on the way back.)"""
    return {
        NatPath(b.address.ip, s.protocol, b.address)
        for s in services
        for b in s.backends
        if b.address != s.listen
    }


class NftDataplane:
    name = "nftables"
    lingers = False  # conntrack keeps the NAT of established flows when a service goes
    carries_affinity = True  # templates are elements of the backends' affinity sets

    def __init__(
        self,
        nft: Nft = run_nft,
        query: Query = query_nft,
        conntrack: Conntrack | None = None,
        netlink: NftNetlink | None = None,
        *,
        flow_threshold: int = 0,
        device: str = "",
        devices: Callable[[], set[str]] = links,
        acct: Callable[[], None] = enable_acct,
    ) -> None:
        self.nft = nft
        self.netlink = netlink
        self.query = query
        self.conntrack = conntrack
        self.foreign: set[ServiceKey] = set()  # nothing outside table lb is ever ours
        self.writes = 0  # transactions sent (an apply with nothing to do sends none)
        self._rendered: dict[ServiceKey, Rendered] | None = None  # None: table not built
        self._pins = PathCounts()  # hairpin paths, by how many services need each
        self._desired: dict[ServiceKey, Service] = {}
        self._counters: dict[str, tuple[int, int]] = {}
        #: the `total` counter (nft_rules.TOTAL) when `_counters` were dumped; None: dump
        self._total: tuple[int, int] | None = None
        self.counter_dumps = 0  # how many times every counter was read
        self._flows: Counter[tuple[ServiceKey, Endpoint, bool]] = Counter()
        self._moved: set[ServiceKey] = set()  # counters or flows moved since active()
        #: persistence templates per (service, backend): the elements of its affinity set
        self._templates: Counter[tuple[ServiceKey, Endpoint]] = Counter()
        self._templates_read = -TEMPLATES_PERIOD
        # The fast path (offload.flow_threshold): a flowtable on every device but lo and
        # lb's own (where the VIPs are: nothing is forwarded through it).
        self.flow_threshold = flow_threshold
        self._skip = {"lo", device}
        self._devices = devices
        self._acct = acct
        #: why there is no flowtable though flow_threshold asks for one (the kernel has
        #: none), said once; None: there is one, or none was asked for
        self.flowtable_unavailable: str | None = None
        self._ft_devices: frozenset[str] = frozenset()  # in the flowtable, as lb wrote them
        self._ft_refused: frozenset[str] = frozenset()  # the last devices the kernel refused

    def not_expressible(self, s: Service) -> str | None:
        return not_expressible_nftables(s)

    async def probe(self) -> None:
        """NftError unless nft runs here with the rights to change the ruleset. With a
        flow threshold, whether the kernel has flowtables: without, lb says so once and
        runs without them."""
        await self.nft(f"table ip {TABLE}\n")  # creates nothing that the first apply keeps
        if self.flow_threshold > 0:
            await self.probe_flowtable()

    async def probe_flowtable(self) -> None:
        try:
            await self.nft(probe_flowtable_script())  # leaves nothing behind
        except NftError as e:
            # nft's first line, past its "/dev/stdin:2:15-16: Error: " (then the script)
            said = str(e).splitlines()[0].split("Error: ", 1)[-1] if str(e) else "refused"
            self.flowtable_unavailable = f"this kernel has no flowtables ({said})"
            emit(
                log,
                logging.WARNING,
                "nft.flowtable_unavailable",
                f"offload.flow_threshold is {self.flow_threshold} but "
                f"{self.flowtable_unavailable}: established flows stay on the forwarding path",
                reason=str(e),
            )
            return
        self.flowtable_unavailable = None

    @property
    def fastpath(self) -> bool:
        """Whether lb's table has a flowtable."""
        return self.flow_threshold > 0 and self.flowtable_unavailable is None

    def fastpath_note(self) -> str:
        """The fast path in a few words, for messages and `lb list`."""
        if self.flow_threshold <= 0:
            return "no flowtable (offload.flow_threshold: 0)"
        if self.flowtable_unavailable is not None:
            return f"no flowtable: {self.flowtable_unavailable}"
        return f"flowtable {FLOWTABLE} after {self.flow_threshold} packets, on " + (
            ", ".join(sorted(self._ft_devices)) or "no device yet"
        )

    def _fastpath_now(self) -> FastPath | None:
        """The flowtable as it should be now (the devices there are), or None."""
        if not self.fastpath:
            return None
        return FastPath(self.flow_threshold, frozenset(self._devices() - self._skip))

    async def _track_devices(self) -> None:
        """Add the devices that appeared to the flowtable (those that went, the kernel
        took out of it by itself). A refused write (a device gone meanwhile) is tried
        again at the next refresh."""
        now = frozenset(self._devices() - self._skip)
        if now == self._ft_devices:
            return
        fresh = now - self._ft_devices
        if fresh:
            try:
                await self.nft(AddFlowtableDevices(fresh).nft() + "\n")
            except NftError as e:
                if fresh != self._ft_refused:  # said once, not at every refresh
                    emit(
                        log,
                        logging.WARNING,
                        "nft.flowtable_devices",
                        f"flowtable {FLOWTABLE}: cannot add {', '.join(sorted(fresh))}: {e}",
                        devices=sorted(fresh),
                    )
                self._ft_refused = fresh
                return
            emit(
                log,
                logging.INFO,
                "nft.flowtable_devices",
                f"flowtable {FLOWTABLE}: added {', '.join(sorted(fresh))}",
                devices=sorted(fresh),
            )
        self._ft_devices = now

    async def apply(
        self,
        desired: list[Service],
        changes: Changes,
        seeds: Mapping[ServiceKey, list[Affinity]] | None = None,
    ) -> None:
        """One transaction with the objects of the services that changed: the work done,
        in Python and in the kernel, is that of the change (`changes`, lb.changes). A
        changed service is compared with the one applied (an equality test). If the
        kernel refuses the transaction, the next apply rebuilds the tables whole.
        `seeds`: persistence templates of services coming from userspace, put in their
        affinity sets in the same transaction, before the kernel takes their new
        connections."""
        seeds = seeds or {}
        old = self._rendered
        fresh, removed = self._changes(desired, changes)
        before = {k: self._desired[k] for k in [*fresh, *removed] if k in self._desired}
        changed = sorted(
            (k for k, s in fresh.items() if old is None or before.get(k) != s), key=str
        )
        for key, svc in fresh.items():
            self._desired[key] = svc
        for key in removed:
            del self._desired[key]
        rendered = old if old is not None else {}
        if old is None:
            self._pins.clear()  # counted afresh for the tables built whole
        gone: set[NatPath] = set()  # hairpin paths no service needs any more
        added: set[NatPath] = set()  # and paths no service needed before
        ops: list[Op] = []
        for key in removed:
            ops += diff_ops(rendered.pop(key, None), None)
            self._pins.remove(hairpin([before[key]]), gone)
        for key in changed:
            new = render(fresh[key])
            if old is not None:
                ops += with_affinity(
                    diff_ops(rendered.get(key), new), affinity_ops(new, seeds.get(key, ()))
                )
            rendered[key] = new
            if old is not None and key in before:
                self._pins.remove(hairpin([before[key]]), gone)
            self._pins.add(hairpin([fresh[key]]), added)
        gone, added = gone - added, added - gone  # moved from one service to another
        if gone:
            ops.insert(0, DeleteMasq(frozenset(gone)))
        if added:
            ops.insert(0, AddMasq(frozenset(added)))
        try:
            if old is None:
                await self._build([rendered[key] for key in changed], seeds)
            elif ops:
                await self._run(ops)
                self.writes += 1
        except BaseException:
            self._rendered = None  # the next apply rebuilds the tables whole
            raise
        self._rendered = rendered
        await self._forget_dead(before, changed)

    def _changes(
        self, desired: list[Service], given: Changes
    ) -> tuple[dict[ServiceKey, Service], list[ServiceKey]]:
        if self._rendered is None:  # the tables are built whole: every service
            fresh = {s.key: s for s in desired}
            return fresh, sorted((k for k in self._desired if k not in fresh), key=str)
        return {s.key: s for s in given.fresh}, given.removed

    async def _build(
        self, services: list[Rendered], seeds: Mapping[ServiceKey, list[Affinity]]
    ) -> None:
        """The first apply: the table replaced by an empty one (`nft -f`, atomic: a table
        left by a crashed lb goes in the same step, the NAT of its flows stays), then the
        services over netlink, `CHUNK` at a time (the first with every masquerade path),
        each with its map element, so that a service is in the map only once it is whole (`nft -f`
        takes minutes to read a script of 10,000 services, and seconds for their 100,000
        paths). The chunks go in a pipeline: the kernel commits one while lb encodes the
        next. Without netlink, all of it in one `nft -f`."""
        fastpath = self._fastpath_now()
        netlink = self.netlink
        self._total = None  # a new table's counters start again: dumped at the next look
        base = base_script(self._pins if netlink is None else (), fastpath)
        # `ct packets` counts a flow's packets only if conntrack accounting was on when the
        # flow began: on before the services (conntrack's sysctls exist once its module is
        # loaded, which lb's nat chains do if nothing did before).
        acct = fastpath is not None and self._enable_acct(quiet=True)

        def ops_of(r: Rendered) -> list[Op]:
            return with_affinity(diff_ops(None, r), affinity_ops(r, seeds.get(r.key, ())))

        if netlink is None:
            ops = [op for r in services for op in ops_of(r)]
            await self.nft("\n".join(base + [op.nft() for op in ops]) + "\n")
        else:
            await self.nft("\n".join(base) + "\n")
        self.writes += 1
        if fastpath is not None and not acct:
            self._enable_acct(quiet=False)
        self._ft_devices = fastpath.devices if fastpath is not None else frozenset()
        if netlink is None:
            return
        # the masquerade paths (counted by apply) first, as the script used to hold them
        paths = frozenset(self._pins)
        committing: asyncio.Future[None] | None = None
        try:
            for start in range(0, len(services), CHUNK):
                chunk = services[start : start + CHUNK]
                ops = [op for r in chunk for op in ops_of(r)]
                if start == 0 and paths:
                    ops.insert(0, AddMasq(paths))
                batch = netlink.prepare(ops)  # while the kernel commits the chunk before
                if committing is not None:
                    await committing
                committing = asyncio.ensure_future(asyncio.to_thread(netlink.send, batch))
                self.writes += 1
            if committing is not None:
                await committing
        except (NftNetlinkError, OSError) as e:
            raise NftError(str(e)) from None

    def _enable_acct(self, quiet: bool) -> bool:
        try:
            self._acct()
        except OSError as e:
            if not quiet:
                emit(
                    log,
                    logging.WARNING,
                    "nft.flowtable_acct",
                    f"cannot turn conntrack accounting on ({e}): no flow reaches the "
                    "flowtable's threshold",
                )
            return False
        return True

    async def _run(self, ops: list[Op]) -> None:
        """A change: over netlink when there is a socket (its cost is the change's), else
        through `nft -f` (which reads the whole ruleset first)."""
        if self.netlink is None:
            await self.nft("\n".join(op.nft() for op in ops) + "\n")
            return
        try:
            await asyncio.to_thread(self.netlink.run, ops)
        except (NftNetlinkError, OSError) as e:
            raise NftError(str(e)) from None

    async def export_affinity(self, key: ServiceKey) -> list[Affinity]:
        """The clients in the service's affinity sets, each with its backend and the time
        it has left (whole seconds, as nft lists them), for the dataplane taking the
        service over. Read before the service leaves the kernel."""
        r = (self._rendered or {}).get(key)
        if r is None or not r.sets:
            return []
        out = []
        for names, rule in r.endpoints.values():
            try:
                doc = await self.query("list", "set", "ip", r.table, names.affinity)
            except (NftError, ValueError) as err:
                emit(log, logging.WARNING, "nft.affinity", f"affinity of {key} unread: {err}")
                continue
            for item in doc.get("nftables", []):
                for listed in item.get("set", {}).get("elem", []):
                    elem = listed.get("elem", {}) if isinstance(listed, dict) else {}
                    value, left = elem.get("val"), elem.get("expires")
                    if isinstance(value, str) and isinstance(left, int | float) and left > 0:
                        out.append(Affinity(ipaddress.ip_address(value), rule.backend, left))
        return out

    async def _forget_dead(
        self, before: dict[ServiceKey, Service], changed: list[ServiceKey]
    ) -> None:
        """UDP flows of backends that were removed, went DOWN or into maintenance: their
        conntrack entries go, so that the clients' next datagrams are scheduled again.
        (A drained backend keeps its flows; a service leaving the kernel keeps them too.)"""
        if self.conntrack is None:
            return
        for key in changed:
            s, old = self._desired[key], before.get(key)
            if key.protocol is not Protocol.UDP or old is None:
                continue
            alive = {b.address for b in s.backends if b.state in ALIVE}
            dead = {b.address for b in old.backends if b.state in ALIVE} - alive
            if not dead:
                continue
            try:
                n = await self.conntrack.forget(key, dead)
            except ConntrackError as e:
                emit(log, logging.WARNING, "nft.conntrack", str(e), service=s.name)
                continue
            emit(
                log,
                logging.INFO,
                "nft.conntrack_cleared",
                f"{n} UDP flows of {s.name} to {', '.join(sorted(map(str, dead)))} forgotten",
                service=s.name,
                flows=n,
                backends=sorted(map(str, dead)),
            )

    async def refresh(self) -> None:
        """Re-read the per-backend counters (new connections) and, with conntrack, the
        flows each backend carries."""
        if self._rendered is None:
            return
        if self.fastpath:
            await self._track_devices()
        counters = await self._read_counters_if_moved()
        before, self._counters = self._counters, counters
        moved = (
            {
                key
                for key, r in (self._rendered or {}).items()  # an apply may have run meanwhile
                if any(counters.get(c.counter) != before.get(c.counter) for c in r.counters)
            }
            # idle: the very dict (the total did not move), else one comparison of them
            if counters is not before and counters != before
            else set()
        )
        self._moved |= moved
        # Every new flow moves a counter (they count in the NAT hooks, which see a flow's
        # first packet): with no flow last time and none new, conntrack has none of lb's,
        # and an idle lb spawns no conntrack each second.
        if self.conntrack is not None and (self._flows or moved):
            try:
                flows = await self.conntrack.flows()
            except ConntrackError:
                flows = []
            self._flows = Counter(_flow_key(f) for f in flows if f.key in self._desired)
            self._moved.update(k for k, _, _ in self._flows)
        await self._count_templates()

    async def _read_counters_if_moved(self) -> dict[str, tuple[int, int]]:
        """The counters as last read if the `total` counter has not moved since (one
        object looked up: an idle lb at 10,000 services does not dump 100,000 counters
        each refresh), else read again."""
        if self.netlink is not None:
            try:
                total = await asyncio.to_thread(self.netlink.counter, TABLE, TOTAL)
            except (NftNetlinkError, OSError):
                total = None
            if total is not None and total == self._total:
                return self._counters
            counters = await self._read_counters()
            self._total = total
            return counters
        return await self._read_counters()

    async def _read_counters(self) -> dict[str, tuple[int, int]]:
        """lb's named counters (all in table `ip lb`): name -> (packets, bytes). One
        netlink dump, in a thread, when there is a socket (an idle lb spawns no `nft`
        each second); else `nft -j list counters`. A table gone (deleted by hand), or a
        read refused: nothing counted."""
        self.counter_dumps += 1
        if self.netlink is not None:
            try:
                dumped = await asyncio.to_thread(self.netlink.counters, TABLE)
            except (NftNetlinkError, OSError):
                return {}
            dumped.pop(TOTAL, None)
            return dumped
        try:
            out = await self.query("list", "counters", "table", "ip", TABLE)  # all of lb's
        except NftError:
            return {}
        counters: dict[str, tuple[int, int]] = {}
        for item in out.get("nftables", []):
            c = item.get("counter")
            if (
                c is not None
                and c.get("family") == "ip"
                and c.get("table") == TABLE
                and c.get("name") != TOTAL
            ):
                counters[c["name"]] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
        return counters

    async def _count_templates(self) -> None:
        """Count the elements of the persistent services' affinity sets (`lb list
        --persistent-conn`) every TEMPLATES_PERIOD, and only while a persistent service
        is carried: a netlink dump of each set, in a thread, when there is a socket; else
        one `nft -j list sets ip`. A set that is not there counts none."""
        now = time.monotonic()
        if now - self._templates_read < TEMPLATES_PERIOD:
            return  # (before looking at the services: an idle refresh walks none of them)
        self._templates_read = now
        sets = {
            (r.table, names.affinity): (key, rule.backend)
            for key, r in (self._rendered or {}).items()
            if r.sets
            for names, rule in r.endpoints.values()
        }
        if not sets:
            self._templates.clear()
            return
        counted: Counter[tuple[ServiceKey, Endpoint]] = Counter()
        if self.netlink is not None:
            try:
                sizes = await asyncio.to_thread(_set_sizes, self.netlink, list(sets))
            except (NftNetlinkError, OSError):
                return  # counted again next period
            for where, size in sizes.items():
                counted[sets[where]] = size
            self._templates = counted
            return
        try:
            doc = await self.query("list", "sets", "ip")
        except (NftError, ValueError):
            return  # counted again next period
        for item in doc.get("nftables", []):
            listed = item.get("set") if isinstance(item, dict) else None
            if not isinstance(listed, dict):
                continue
            owner = sets.get((str(listed.get("table")), str(listed.get("name"))))
            if owner is not None:
                counted[owner] = len(listed.get("elem") or [])
        self._templates = counted

    async def owned(self) -> set[ServiceKey]:
        return set(self._rendered or ())

    def has(self, key: ServiceKey) -> bool:
        return self._rendered is not None and key in self._rendered

    def drained(self, key: ServiceKey, keep: Endpoint | None = None) -> bool:
        return True  # nothing to wait for: conntrack carries established flows on

    def active(self) -> list[ServiceSnapshot]:
        """The services whose counters or flows moved in the refreshes since the last call."""
        moved, self._moved = self._moved, set()
        return [snap for key in moved for snap in self.observe(only=key)]

    def observe(self, only: ServiceKey | None = None) -> list[ServiceSnapshot]:
        out = []
        services: Iterable[tuple[ServiceKey, Service]]
        if only is None:
            services = self._desired.items()
        else:
            services = [(only, self._desired[only])] if only in self._desired else []
        for key, s in services:
            if not self.has(key):
                continue
            backends = []
            for b in reversed(s.backends):  # the kernel's order, as the other dataplanes
                conns, _ = self._counters.get(Names.of(key, b.address).counter, (0, 0))
                backends.append(
                    BackendSnapshot(
                        address=b.address,
                        backend=b,
                        weight=b.effective_weight,
                        active=self._flows[(key, b.address, True)],
                        inactive=self._flows[(key, b.address, False)],
                        persistent=self._templates[(key, b.address)],
                        overloaded=False,
                        totals=_connections_only(conns),
                    )
                )
            total = sum(b.totals.conns for b in backends)
            out.append(
                ServiceSnapshot(
                    service=s,
                    dataplane=self.name,
                    listening=True,
                    open=sum(b.active for b in backends),
                    totals=_connections_only(total),
                    backends=tuple(backends),
                )
            )
        return out

    async def remove_all(self) -> None:
        """Delete lb's tables (shutdown, `lb cleanup`)."""
        await self.nft(remove_script())  # the flowtable goes with table lb
        self._rendered = None
        self._desired.clear()
        self._pins.clear()
        self._ft_devices = frozenset()


def _connections_only(conns: int) -> Totals:
    """nftables counts connections (conntrack), not bytes or packets, per backend."""
    return Totals(
        conns=conns,
        bytes_in=0,
        bytes_out=0,
        packets_in=0,
        packets_out=0,
        errors=dict.fromkeys(ErrorReason, 0),
    )


def _flow_key(f: Flow) -> tuple[ServiceKey, Endpoint, bool]:
    return (f.key, f.backend, f.established)


def _set_sizes(netlink: NftNetlink, sets: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The elements of these (table, set) that are there, by table: the sizes of each."""
    by_table: dict[str, list[str]] = {}
    for table, name in sets:
        by_table.setdefault(table, []).append(name)
    return {
        (table, name): size
        for table, names in by_table.items()
        for name, size in netlink.set_sizes(table, names).items()
    }
