"""The nftables NAT dataplane: make table `ip lb` carry a desired set of services.

The first apply replaces the table whole (one atomic transaction: a leftover table from a
crashed run is adopted that way, and connections it had set up keep their conntrack NAT).
Every later apply sends only the objects of the services that changed
(`offload.nft_rules.diff_ops`), also as one transaction, over netlink
(`offload/nft_netlink.py`): nothing is ever half applied, and the cost of a change does
not grow with the number of services. Other tables are never touched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from lb.log import emit
from lb.model import BackendState, Endpoint, Protocol, Service, ServiceKey
from lb.stats import BackendSnapshot, ErrorReason, ServiceSnapshot, Totals
from offload.conntrack import Conntrack, ConntrackError, Flow
from offload.nft_netlink import NftNetlink, NftNetlinkError
from offload.nft_rules import (
    TABLE,
    AddMasq,
    DeleteMasq,
    Names,
    NatPath,
    Op,
    Rendered,
    base_script,
    diff_ops,
    not_expressible_nft,
    render,
)
from offload.policy import not_expressible

Nft = Callable[[str], Awaitable[str]]
Query = Callable[..., Awaitable[Any]]

log = logging.getLogger("lb.offload")

ALIVE = frozenset({BackendState.UP, BackendState.DRAIN})  # their flows go on


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

    def __init__(
        self,
        nft: Nft = run_nft,
        query: Query = query_nft,
        conntrack: Conntrack | None = None,
        netlink: NftNetlink | None = None,
    ) -> None:
        self.nft = nft
        self.netlink = netlink
        self.query = query
        self.conntrack = conntrack
        self.foreign: set[ServiceKey] = set()  # nothing outside table lb is ever ours
        self.writes = 0  # transactions sent (an apply with nothing to do sends none)
        self._rendered: dict[ServiceKey, Rendered] | None = None  # None: table not built
        self._pins: Counter[NatPath] = Counter()  # hairpin paths, by how many services need each
        self._desired: dict[ServiceKey, Service] = {}
        self._counters: dict[str, tuple[int, int]] = {}
        self._flows: Counter[tuple[ServiceKey, Endpoint, bool]] = Counter()

    def not_expressible(self, s: Service) -> str | None:
        return not_expressible(s) or not_expressible_nft(s)

    async def probe(self) -> None:
        """NftError unless nft runs here with the rights to change the ruleset."""
        await self.nft(f"table ip {TABLE}\n")  # creates nothing that the first apply keeps

    async def apply(self, desired: list[Service]) -> None:
        """One transaction with the objects of the services that changed: the work done,
        in Python and in nft's transaction, is that of the change (each service is compared
        with the one applied before, an equality test)."""
        services = {s.key: s for s in desired}
        before = self._desired
        old = self._rendered
        rendered = dict(old or {})
        changed = sorted(
            (k for k, s in services.items() if old is None or before.get(k) != s), key=str
        )
        removed = sorted((k for k in before if k not in services), key=str)
        gone: set[NatPath] = set()  # hairpin paths no service needs any more
        added: set[NatPath] = set()  # and paths no service needed before
        for key in removed:
            del rendered[key]
            self._unpin(hairpin([before[key]]), gone)
        for key in changed:
            rendered[key] = render(services[key])
            if key in before:
                self._unpin(hairpin([before[key]]), gone)
            for path in hairpin([services[key]]):
                if not self._pins[path]:
                    added.add(path)
                self._pins[path] += 1
        gone, added = gone - added, added - gone  # moved from one service to another
        ops: list[Op] = []
        if old is not None and gone:
            ops.append(DeleteMasq(frozenset(gone)))
        if old is not None and added:
            ops.append(AddMasq(frozenset(added)))
        for key in [*removed, *changed]:
            ops += diff_ops((old or {}).get(key), rendered.get(key))
        if old is None:  # the table, whole, through nft
            await self.nft("\n".join(base_script(self._pins) + [op.nft() for op in ops]) + "\n")
            self.writes += 1
        elif ops:
            await self._run(ops)
            self.writes += 1
        self._rendered = rendered
        self._desired = services
        await self._forget_dead(before, changed)

    def _unpin(self, paths: set[NatPath], gone: set[NatPath]) -> None:
        for path in paths:
            self._pins[path] -= 1
            if self._pins[path] <= 0:
                del self._pins[path]
                gone.add(path)

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
        out = await self.query("list", "counters", "table", "ip", TABLE)
        counters: dict[str, tuple[int, int]] = {}
        for item in out.get("nftables", []):
            c = item.get("counter")
            if c is not None:
                counters[c["name"]] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
        self._counters = counters
        if self.conntrack is not None:
            try:
                flows = await self.conntrack.flows()
            except ConntrackError:
                flows = []
            self._flows = Counter(_flow_key(f) for f in flows if f.key in self._desired)

    async def owned(self) -> set[ServiceKey]:
        return set(self._rendered or ())

    def has(self, key: ServiceKey) -> bool:
        return self._rendered is not None and key in self._rendered

    def drained(self, key: ServiceKey, keep: Endpoint | None = None) -> bool:
        return True  # nothing to wait for: conntrack carries established flows on

    def observe(self) -> list[ServiceSnapshot]:
        out = []
        for key, s in self._desired.items():
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
                        persistent=0,
                        overloaded=False,
                        totals=Totals(conns, 0, 0, 0, 0, dict.fromkeys(ErrorReason, 0)),
                    )
                )
            total = sum(b.totals.conns for b in backends)
            out.append(
                ServiceSnapshot(
                    service=s,
                    dataplane=self.name,
                    listening=True,
                    open=sum(b.active for b in backends),
                    totals=Totals(total, 0, 0, 0, 0, dict.fromkeys(ErrorReason, 0)),
                    backends=tuple(backends),
                )
            )
        return out

    async def remove_all(self) -> None:
        """Delete table lb (shutdown, `lb cleanup`)."""
        try:
            await self.nft(f"delete table ip {TABLE}\n")
        except NftError as e:
            if "No such file or directory" not in str(e):
                raise
        self._rendered = None
        self._desired.clear()
        self._pins.clear()


def _flow_key(f: Flow) -> tuple[ServiceKey, Endpoint, bool]:
    return (f.key, f.backend, f.established)
