"""The offload manager: userspace for every service, a kernel dataplane (IPVS or nftables)
for those that should be there, and live moves between the two that lose no connection.

It is the dataplane the controller drives. Every service keeps its userspace listener on
VIP:port whatever carries it, so that:
- promote = add the service to the kernel: new connections go to the kernel, connections
  the userspace listener already has keep working (IPVS ignores packets it did not
  schedule; nftables NATs only a flow's first packet, and theirs were not NATed);
- demote, IPVS: add VIP:port itself as a local destination (the kernel hands those
  connections to the listener unchanged), quiesce the NAT destinations, wait until their
  connections are gone (or `drain_timeout`), then delete the IPVS service. Deleting first
  would reset every connection the kernel carries (docs/dataplanes/ipvs.md);
- demote, nftables: delete the service's map element and chains in one transaction: new
  connections reach the listener, established flows keep the NAT conntrack gave them.

The decisions (which service where, when a move starts and ends, what the kernel is
given, which VIPs are needed) are offload/placement.py's, pure code with its invariants
stated and property-tested; this module only executes its actions: it logs the moves,
hands the kernel dataplane its forms, reports back, and keeps lb's device in step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from lb.changes import Changes
from lb.log import emit
from lb.model import IPAddress, Mode, Service, ServiceKey
from lb.persist import Affinity
from lb.proxy.dataplane import UserspaceDataplane
from lb.stats import Offload, Placement, ServiceSnapshot
from offload.host import Host
from offload.kernel import KernelDataplane
from offload.placement import Actions, Move, Moved, Placements
from offload.policy import OffloadPolicy

log = logging.getLogger("lb.offload")

TICK = 1.0
#: A refresh of the kernel's counters waits this many times as long as the last one took.
REFRESH_DUTY = 20.0


class OffloadManager:
    """Work is that of the change: an apply looks only at the services that are new,
    changed or gone (the `Changes` handed down, lb.changes), the ticker only at those a timer or a
    demotion concerns; idle services cost nothing however many there are."""

    name = "offload"

    def __init__(
        self,
        userspace: UserspaceDataplane,
        *,
        on_sync: Callable[[str, float], None] | None = None,
    ) -> None:
        self.userspace = userspace
        self.kernel: KernelDataplane | None = None
        self.host: Host | None = None
        self.policy = OffloadPolicy(Mode.USERSPACE, 10.0, 3)
        self.drain_timeout = 300.0
        self.placements = Placements(self.policy)  # the decisions
        self._on_sync = on_sync
        self._held: set[IPAddress] | None = None  # VIPs on lb's device; None: not read yet
        self._lock = asyncio.Lock()
        self._tick: asyncio.Task[None] | None = None
        self._next_refresh = 0.0
        self._observed: float | None = None  # when the kernel's last refresh started

    def enable(
        self,
        policy: OffloadPolicy,
        kernel: KernelDataplane | None,
        host: Host | None,
        drain_timeout: float,
        affinity_wait: float = 300.0,
    ) -> None:
        """Set the mode before the first apply (kernel/host None: no kernel path here)."""
        self.policy = policy
        self.kernel = kernel
        self.host = host
        if kernel is not None:
            policy.check = kernel.not_expressible
        self.drain_timeout = drain_timeout
        self.placements.enable(
            policy,
            kernel.name if kernel is not None else None,
            kernel is not None and kernel.lingers,
            host.device if host is not None and kernel is not None else None,
            drain_timeout,
        )
        self.placements.affinity_wait = affinity_wait
        self.placements.affinity_until = (
            self._templates_until if kernel is not None and not kernel.carries_affinity else None
        )

    def _templates_until(self, key: ServiceKey, now: float) -> float | None:
        """When the key's persistence templates in userspace will all have expired."""
        held = self.userspace.export_affinity(key)
        return now + max(a.remaining for a in held) if held else None

    # --- the Dataplane surface -------------------------------------------------------------

    async def apply(self, desired: list[Service], changes: Changes) -> None:
        loop = asyncio.get_running_loop()
        async with self._lock:
            ch = changes
            new = [s for s in ch.fresh if self.placements.service(s.key) is None]
            try:
                await self._add_vips(new)
                start = loop.time()
                await self.userspace.apply(desired, ch)
                if self._on_sync is not None:
                    self._on_sync("userspace", loop.time() - start)
            except BaseException:
                self.placements.unclaim(s.key for s in new)  # the next apply starts over
                raise
            self._see_kernel()
            now = loop.time()
            await self._run(
                self.placements.edit(ch.fresh, ch.removed, now, self._drained(), self._observed)
            )
        if self._tick is None:
            self._tick = loop.create_task(self._ticker())

    def observe(self, only: ServiceKey | None = None) -> list[ServiceSnapshot]:
        """Every service's snapshots, or `only` that one's (the work: that service's)."""
        out = []
        placement = self.placements.placement
        for snap in self.userspace.observe(only):
            if placement(snap.service.key) is Placement.KERNEL and snap.open == 0:
                continue  # the kernel carries it: the idle listener is not worth a line
            out.append(snap)
        if self.kernel is not None:
            out += [self._shown(s) for s in self.kernel.observe(only=only)]
        return out

    def active(self) -> list[ServiceSnapshot]:
        """The services whose counters may have moved since the last call (for rates)."""
        out = self.userspace.active()
        if self.kernel is not None:
            out += [self._shown(s) for s in self.kernel.active()]
        return out

    def carries(self, key: ServiceKey, dataplane: str) -> bool:
        if dataplane == self.userspace.name:
            return self.userspace.has(key)
        return self.kernel is not None and self.kernel.has(key)

    def _shown(self, snap: ServiceSnapshot) -> ServiceSnapshot:
        """A kernel snapshot with the service as configured (not its demoting form)."""
        shown = self.placements.shown(snap.service.key)
        return replace(snap, service=shown) if shown is not None else snap

    def explain(self, key: ServiceKey) -> Offload:
        return self.placements.explain(key)

    def kernel_note(self) -> str | None:
        if self.policy.mode is Mode.USERSPACE:
            return None
        if self.kernel is None:
            return f"none ({self.policy.unavailable or 'not enabled'})"
        device = f" on {self.host.device}" if self.host is not None else ""
        return f"{self.kernel.name}{device}; {self.kernel.fastpath_note()}"

    async def close(self, grace: float) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        await self.userspace.close(grace)
        async with self._lock:
            if self.kernel is not None:
                await self.kernel.remove_all()
            if self.host is not None:
                await self.host.remove()

    # --- VIPs ----------------------------------------------------------------------------------

    async def _add_vips(self, new: list[Service]) -> None:
        """Before the listeners of new services bind: put their VIPs on the device. A VIP
        that is on another device stays there (and its service in userspace)."""
        if self.host is None or self.kernel is None or not new:
            return
        device = self.host.device
        held = await self._read_addresses()
        # Every VIP that is not an address of this host already: a service the kernel
        # cannot carry is served by its userspace listener on the same device (as
        # kube-proxy's IPVS mode binds every cluster IP to kube-ipvs0).
        self.placements.claim(new)
        wanted = held.union(self.placements.needed_vips())
        await self._set_held(wanted)
        local = self.placements.local
        for ip in wanted:
            local[ip] = device

    async def _read_addresses(self) -> set[IPAddress]:
        """Read the host's addresses; the first time, the VIPs on lb's device are taken
        as held (what a previous run left, which it may still use or must drop)."""
        assert self.host is not None
        local = self.placements.local = await self.host.local_addresses()
        if self._held is None:
            self._held = {
                ip for ip, dev in local.items() if dev == self.host.device and not ip.is_link_local
            }
        return self._held

    async def _drop_vips(self) -> None:
        """After the kernel changed: drop the VIPs nothing needs any more. A VIP stays while
        a kernel service of lb's uses it (the VIPs on the device are how lb knows which
        IPVS services are its own), and while a userspace listener on it finishes."""
        if self.host is None or self.kernel is None:
            return
        held = self._held if self._held is not None else await self._read_addresses()
        unused = held.difference(self.placements.needed_vips())
        if not unused:
            return
        unused -= {rt.service.listen.ip for rt in self.userspace.retired}
        unused -= {key.listen.ip for key in await self.kernel.owned()}
        if unused:
            await self._set_held(held - unused)

    async def _set_held(self, wanted: set[IPAddress]) -> None:
        assert self.host is not None and self._held is not None
        if wanted == self._held:
            return
        try:
            await self.host.change_vips(wanted - self._held, self._held - wanted)
        except Exception:  # the device was changed behind lb's back: read it, then set it
            await self.host.set_vips(wanted)
        self._held = wanted

    # --- executing the decisions ---------------------------------------------------------------

    def _see_kernel(self) -> None:
        """What the decisions read of the kernel dataplane: the keys it found foreign."""
        if self.kernel is not None:
            self.placements.foreign = frozenset(self.kernel.foreign)

    def _drained(self) -> set[ServiceKey]:
        """The draining keys the kernel has no connection left for (by its last refresh)."""
        kernel = self.kernel
        if kernel is None:
            return set()
        return {
            key
            for key, keep in self.placements.draining().items()
            if (keep is not None or kernel.has(key)) and kernel.drained(key, keep)
        }

    async def _run(self, actions: Actions) -> None:
        """Log the moves, give the kernel what changed, report back (which may decide
        again: keys the apply found foreign), then drop the VIPs nothing needs."""
        loop = asyncio.get_running_loop()
        self._log(actions)
        if self.kernel is None or actions.kernel is None:
            return
        start = loop.time()
        for _ in range(2):  # the write, and the one for keys it found foreign, if any
            write = actions.kernel
            if write is None:
                break
            seeds = await self._carry_affinity(actions.moves)
            try:
                await self.kernel.apply(write.forms, write.changes, seeds)
            except BaseException:
                self.placements.apply_failed()
                raise
            actions = self.placements.applied(loop.time(), self.kernel.foreign)
            self._log(actions)
        if self._on_sync is not None:
            self._on_sync(self.kernel.name, loop.time() - start)
        await self._drop_vips()

    async def _carry_affinity(self, moves: list[Moved]) -> dict[ServiceKey, list[Affinity]]:
        """Persistence templates move with their service, before the path taking it over
        gets its new connections: a demote seeds userspace with the kernel's (read while
        the kernel still carries it), a promote hands userspace's to the kernel write (the
        seeds), where the kernel dataplane can take them (`carries_affinity`)."""
        assert self.kernel is not None
        seeds: dict[ServiceKey, list[Affinity]] = {}
        for m in moves:
            if m.move is Move.PROMOTE and self.kernel.carries_affinity:
                held = self.userspace.export_affinity(m.key)
                if held:
                    seeds[m.key] = held
                    self._carried(m, len(held), f"to {self.kernel.name}")
            elif m.move is Move.DEMOTE:
                held = await self.kernel.export_affinity(m.key)
                if held:
                    taken = self.userspace.seed_affinity(m.key, held)
                    self._carried(m, taken, "to userspace")
        return seeds

    def _carried(self, m: Moved, n: int, where: str) -> None:
        emit(
            log,
            logging.INFO,
            "offload.affinity",
            f"service {m.name}: {n} persistence template{'s' if n != 1 else ''} moved {where}",
            service=m.name,
            templates=n,
        )

    def _log(self, actions: Actions) -> None:
        for m in actions.moves:
            if m.move is Move.PROMOTE:
                name = self.kernel.name if self.kernel is not None else "the kernel"
                what = f"moves to {name} ({m.reason})"
            elif m.move is Move.DEMOTE:
                what = f"moves back to userspace ({m.reason})"
            else:
                what = "is back in userspace"
            emit(
                log,
                logging.INFO,
                m.move.value,
                f"service {m.name} {what}",
                service=m.name,
                reason=m.reason,
            )

    async def _ticker(self) -> None:
        """Refresh kernel counters (at most 5% of the time: reading them grows with the
        services), finish demotions and orphans, promote services that calmed down."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK)
            try:
                # outside the lock: a slow read of counters must not hold back a change
                if self.kernel is not None and loop.time() >= self._next_refresh:
                    start = loop.time()
                    await self.kernel.refresh()
                    self._observed = start
                    spent = loop.time() - start
                    self._next_refresh = start + max(TICK, REFRESH_DUTY * spent)
                async with self._lock:
                    self._see_kernel()
                    now = loop.time()
                    await self._run(self.placements.tick(now, self._drained(), self._observed))
            except Exception:
                log.exception("offload reconcile failed")
