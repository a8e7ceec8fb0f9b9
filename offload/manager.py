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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from lb.changes import Applied, Changes
from lb.log import emit
from lb.model import IPAddress, Mode, Service, ServiceKey
from lb.proxy.dataplane import UserspaceDataplane
from lb.stats import Offload, Placement, ServiceSnapshot
from offload.host import Host
from offload.kernel import KernelDataplane
from offload.policy import OffloadPolicy, demoting_form, orphan_form

log = logging.getLogger("lb.offload")

TICK = 1.0
#: A refresh of the kernel's counters waits this many times as long as the last one took.
REFRESH_DUTY = 20.0


class OffloadManager:
    """Work is that of the change: an apply looks only at the services that are new,
    changed or gone (found by identity, lb.changes), the ticker only at those a timer or a
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
        self._on_sync = on_sync
        self._desired: dict[ServiceKey, Service] = {}
        self._applied = Applied()
        self._placement: dict[ServiceKey, Placement] = {}
        self._reasons: dict[ServiceKey, str] = {}
        self._demote_started: dict[ServiceKey, float] = {}
        self._orphans: dict[ServiceKey, Service] = {}  # left the config while in the kernel
        # What the kernel is given, by service: the service itself, or its demoting or
        # orphan form (made once per service object, so that the kernel sees no change).
        self._forms: dict[ServiceKey, Service] = {}
        self._made: dict[ServiceKey, tuple[Service, Placement | None, Service]] = {}
        # The VIPs lb holds on its device, and which service needs each.
        self._held: set[IPAddress] | None = None  # None: not read from the device yet
        self._vip_of: dict[ServiceKey, IPAddress] = {}
        self._local: dict[IPAddress, str] = {}
        self._lock = asyncio.Lock()
        self._tick: asyncio.Task[None] | None = None
        self._next_refresh = 0.0
        # The kernel must get an apply although nothing changed: the first one (it adopts
        # or clears what a previous run left), or the one after an apply that failed.
        self._kernel_stale = True
        self._kernel_dirty: set[ServiceKey] = set()  # keys whose kernel form changed

    def enable(
        self,
        policy: OffloadPolicy,
        kernel: KernelDataplane | None,
        host: Host | None,
        drain_timeout: float,
    ) -> None:
        """Set the mode before the first apply (kernel/host None: no kernel path here)."""
        self.policy = policy
        self.kernel = kernel
        self.host = host
        if kernel is not None:
            policy.check = kernel.not_expressible
        self.drain_timeout = drain_timeout

    # --- the Dataplane surface -------------------------------------------------------------

    async def apply(self, desired: list[Service], changes: Changes | None = None) -> None:
        loop = asyncio.get_running_loop()
        async with self._lock:
            ch = self._applied.changes(desired, changes)
            undo = {key: self._desired.get(key) for key in ch.touched()}
            for key in ch.removed:
                self._desired.pop(key, None)
            new = [s for s in ch.fresh if undo[s.key] is None]
            for s in ch.fresh:
                self._desired[s.key] = s
            try:
                await self._add_vips(new)
                start = loop.time()
                await self.userspace.apply(desired, ch)
                if self._on_sync is not None:
                    self._on_sync("userspace", loop.time() - start)
            except BaseException:
                for key, old in undo.items():  # as before: the next apply starts from there
                    if old is None:
                        self._desired.pop(key, None)
                    else:
                        self._desired[key] = old
                raise
            self._applied.commit(ch)
            self.policy.observe(ch.fresh, ch.removed, loop.time())
            await self._reconcile(ch.touched())
        if self._tick is None:
            self._tick = loop.create_task(self._ticker())

    def observe(self, only: ServiceKey | None = None) -> list[ServiceSnapshot]:
        """Every service's snapshots, or `only` that one's (the work: that service's)."""
        out = []
        for snap in self.userspace.observe(only):
            key = snap.service.key
            if self._placement.get(key, Placement.USERSPACE) is Placement.KERNEL and snap.open == 0:
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
        key = snap.service.key
        shown = self._desired.get(key) or self._orphans.get(key)
        return replace(snap, service=shown) if shown is not None else snap

    def explain(self, key: ServiceKey) -> Offload:
        placement = self._placement.get(key, Placement.USERSPACE)
        return Offload(placement, self._reasons.get(key, "dataplane: userspace"))

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
        for s in new:
            ip = s.listen.ip
            # Every VIP that is not an address of this host already: a service the kernel
            # cannot carry is served by its userspace listener on the same device (as
            # kube-proxy's IPVS mode binds every cluster IP to kube-ipvs0).
            if not ip.is_unspecified and self._local.get(ip, device) == device:
                self._vip_of[s.key] = ip  # held as long as the service is there
        wanted = held | set(self._vip_of.values())
        await self._set_held(wanted)
        for ip in wanted:
            self._local[ip] = device

    async def _read_addresses(self) -> set[IPAddress]:
        """Read the host's addresses; the first time, the VIPs on lb's device are taken
        as held (what a previous run left, which it may still use or must drop)."""
        assert self.host is not None
        self._local = await self.host.local_addresses()
        if self._held is None:
            self._held = {
                ip
                for ip, dev in self._local.items()
                if dev == self.host.device and not ip.is_link_local
            }
        return self._held

    async def _drop_vips(self) -> None:
        """After the kernel changed: drop the VIPs nothing needs any more. A VIP stays while
        a kernel service of lb's uses it (the VIPs on the device are how lb knows which
        IPVS services are its own), and while a userspace listener on it finishes."""
        if self.host is None or self.kernel is None:
            return
        held = self._held if self._held is not None else await self._read_addresses()
        unused = held - set(self._vip_of.values())
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

    # --- decisions ---------------------------------------------------------------------------

    def _want(self, s: Service, now: float) -> tuple[bool, str]:
        if (
            self.host is not None
            and self._local.get(s.listen.ip, self.host.device) != self.host.device
        ):
            where = self._local[s.listen.ip]
            return (
                False,
                f"VIP {s.listen.ip} is on {where}: lb offloads only VIPs on {self.host.device}",
            )
        if self.kernel is not None and s.key in self.kernel.foreign:
            return False, f"an IPVS service lb does not own already uses {s.key}"
        current = self._placement.get(s.key, Placement.USERSPACE)
        w = self.policy.want(s.key, now, current is Placement.KERNEL)
        return w.kernel, w.reason

    async def _reconcile(self, keys: set[ServiceKey]) -> None:
        """Move the services of `keys` (and those a timer or a demotion concerns) as the
        policy says, then give the kernel what changed."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        lingers = self.kernel is not None and self.kernel.lingers
        keys = keys | self.policy.due(now) | self._demote_started.keys() | self._orphans.keys()
        for key in keys:
            s = self._desired.get(key)
            if s is None:
                gone = self._placement.pop(key, None)
                previous = self._made.get(key)
                if (
                    gone is not None
                    and gone is not Placement.USERSPACE
                    and lingers
                    and previous is not None
                ):
                    self._orphans[key] = previous[0]
                self._reasons.pop(key, None)
                self._demote_started.pop(key, None)
                orphan = self._orphans.get(key)
                if orphan is not None and (
                    self.kernel is not None and self.kernel.has(key) and self.kernel.drained(key)
                ):
                    del self._orphans[key]
                    orphan = None
                if orphan is None:
                    self._vip_of.pop(key, None)
                self._give(key, orphan, None)
                continue
            self._orphans.pop(key, None)
            placement = self._decide(s, now, lingers)
            self._give(key, s, placement)
        if self.kernel is None or not (self._kernel_dirty or self._kernel_stale):
            return
        start = loop.time()
        foreign = set(self.kernel.foreign)
        self._kernel_stale = True  # until this apply is through
        await self.kernel.apply(list(self._forms.values()), self._dirty_changes())
        self._kernel_stale = False
        self._kernel_dirty = set()
        # the apply found services of another program's (IPVS): those keys stay in
        # userspace, decided again now (nothing else would look at them again)
        flipped = (self.kernel.foreign ^ foreign) & self._desired.keys()
        if flipped:
            for key in flipped:
                s = self._desired[key]
                self._give(key, s, self._decide(s, now, lingers))
            if self._kernel_dirty:
                await self.kernel.apply(list(self._forms.values()), self._dirty_changes())
                self._kernel_dirty = set()
        if self._on_sync is not None:
            self._on_sync(self.kernel.name, loop.time() - start)
        await self._drop_vips()

    def _dirty_changes(self) -> Changes:
        forms, dirty = self._forms, self._kernel_dirty
        return Changes(
            [forms[k] for k in dirty if k in forms], [k for k in dirty if k not in forms]
        )

    def _decide(self, s: Service, now: float, lingers: bool) -> Placement:
        want, reason = self._want(s, now)
        self._reasons[s.key] = reason
        current = self._placement.get(s.key, Placement.USERSPACE)
        if want and current is Placement.USERSPACE:
            self._placement[s.key] = Placement.KERNEL
            self._demote_started.pop(s.key, None)
            name = self.kernel.name if self.kernel is not None else "the kernel"
            self._moved(s, "offload.promote", f"moves to {name} ({reason})", reason)
        elif not want and current is Placement.KERNEL:
            self._moved(s, "offload.demote", f"moves back to userspace ({reason})", reason)
            if lingers:
                self._placement[s.key] = Placement.DEMOTING
                self._demote_started[s.key] = now
            else:
                self._placement[s.key] = Placement.USERSPACE
                self._moved(s, "offload.demoted", "is back in userspace")
        elif current is Placement.DEMOTING and self.kernel is not None:
            started = self._demote_started.get(s.key, now)
            if self.kernel.drained(s.key, keep=s.listen) or now - started >= self.drain_timeout:
                self._placement[s.key] = Placement.USERSPACE
                self._demote_started.pop(s.key, None)
                self._moved(s, "offload.demoted", "is back in userspace")
                if want:  # calm again meanwhile: no timer will bring it up, so now
                    return self._decide(s, now, lingers)
        return self._placement.get(s.key, Placement.USERSPACE)

    def _give(self, key: ServiceKey, s: Service | None, placement: Placement | None) -> None:
        """Set what the kernel gets for `key`: `s` as placed (None: an orphan, or nothing);
        a key whose form changed is one the next kernel apply is told of."""
        form: Service | None = None
        if s is not None and placement is not Placement.USERSPACE:
            made = self._made.get(key)
            if made is not None and made[0] is s and made[1] is placement:
                form = made[2]
            else:
                if placement is Placement.KERNEL:
                    form = s
                elif placement is Placement.DEMOTING:
                    form = demoting_form(s)
                else:
                    form = orphan_form(s)
                self._made[key] = (s, placement, form)
        elif s is not None:
            self._made[key] = (s, placement, s)
        else:
            self._made.pop(key, None)
        old = self._forms.get(key)
        if old is form:
            return
        if form is None:
            del self._forms[key]
        else:
            self._forms[key] = form
        self._kernel_dirty.add(key)

    def _moved(self, s: Service, event: str, what: str, reason: str | None = None) -> None:
        emit(log, logging.INFO, event, f"service {s.name} {what}", service=s.name, reason=reason)

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
                    spent = loop.time() - start
                    self._next_refresh = start + max(TICK, REFRESH_DUTY * spent)
                async with self._lock:
                    await self._reconcile(set())
            except Exception:
                log.exception("offload reconcile failed")
