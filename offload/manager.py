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
  would reset every connection the kernel carries (ipvs-reference.md);
- demote, nftables: delete the service's map element and chains in one transaction: new
  connections reach the listener, established flows keep the NAT conntrack gave them.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from lb.log import emit
from lb.model import IPAddress, Service, ServiceKey
from lb.proxy.dataplane import UserspaceDataplane
from lb.stats import ServiceSnapshot
from offload.host import Host
from offload.kernel import KernelDataplane
from offload.policy import Mode, OffloadPolicy, demoting_form, orphan_form

log = logging.getLogger("lb.offload")

TICK = 1.0


class Placement(enum.StrEnum):
    USERSPACE = "userspace"
    KERNEL = "kernel"
    DEMOTING = "demoting"  # IPVS hands new connections back while its NAT ones drain


@dataclass(frozen=True, slots=True)
class Offload:
    placement: Placement
    reason: str


class OffloadManager:
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
        self._desired: list[Service] = []
        self._placement: dict[ServiceKey, Placement] = {}
        self._reasons: dict[ServiceKey, str] = {}
        self._demote_started: dict[ServiceKey, float] = {}
        self._orphans: dict[ServiceKey, Service] = {}  # left the config while in the kernel
        self._previous: dict[ServiceKey, Service] = {}
        self._lock = asyncio.Lock()
        self._tick: asyncio.Task[None] | None = None
        self._local: dict[IPAddress, str] = {}

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

    async def apply(self, desired: list[Service]) -> None:
        loop = asyncio.get_running_loop()
        async with self._lock:
            self._desired = list(desired)
            await self._sync_vips(remove=False)
            start = loop.time()
            await self.userspace.apply(desired)
            if self._on_sync is not None:
                self._on_sync("userspace", loop.time() - start)
            self.policy.observe(desired, loop.time())
            await self._reconcile()
        if self._tick is None:
            self._tick = loop.create_task(self._ticker())

    def observe(self) -> list[ServiceSnapshot]:
        by_key = {s.key: s for s in self._desired}
        out = []
        kernel = {s.service.key: s for s in self.kernel.observe()} if self.kernel else {}
        for snap in self.userspace.observe():
            key = snap.service.key
            if self._placement.get(key, Placement.USERSPACE) is Placement.KERNEL and snap.open == 0:
                continue  # the kernel carries it: the idle listener is not worth a line
            out.append(snap)
        for key, snap in kernel.items():
            shown = by_key.get(key) or self._orphans.get(key)
            out.append(replace(snap, service=shown) if shown is not None else snap)
        return out

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

    # --- decisions ---------------------------------------------------------------------------

    async def _sync_vips(self, *, remove: bool) -> None:
        """Before the listeners bind: add the VIPs lb may offload. After IPVS changed: drop
        those nothing needs any more. A VIP stays while an IPVS service on it exists: the
        VIPs on the device are how lb knows which IPVS services are its own."""
        if self.host is None or self.kernel is None:
            return
        device = self.host.device
        self._local = await self.host.local_addresses()
        held = {ip for ip, dev in self._local.items() if dev == device and not ip.is_link_local}
        wanted = {
            s.listen.ip
            for s in self._desired
            if self.policy.check(s) is None and self._local.get(s.listen.ip, device) == device
        }
        wanted |= {key.listen.ip for key in self._orphans}
        wanted |= {rt.service.listen.ip for rt in self.userspace.retired} & held  # still finishing
        wanted |= {key.listen.ip for key in await self.kernel.owned()} & held
        await self.host.set_vips(wanted if remove else wanted | held)

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

    async def _reconcile(self) -> None:
        """Move services as the policy says, then give the kernel its desired state."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        lingers = self.kernel is not None and self.kernel.lingers
        wanted_keys = {s.key for s in self._desired}
        for key in [k for k in self._placement if k not in wanted_keys]:
            gone = self._placement.pop(key)
            if gone is not Placement.USERSPACE and lingers and key in self._previous:
                self._orphans[key] = self._previous[key]
            self._reasons.pop(key, None)
            self._demote_started.pop(key, None)
        self._previous = {s.key: s for s in self._desired}
        kernel: list[Service] = []
        for s in self._desired:
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
            placement = self._placement.get(s.key, Placement.USERSPACE)
            if placement is Placement.KERNEL:
                kernel.append(s)
            elif placement is Placement.DEMOTING:
                kernel.append(demoting_form(s))
        for key, s in list(self._orphans.items()):
            if key in wanted_keys or (
                self.kernel is not None and self.kernel.has(key) and self.kernel.drained(key)
            ):
                del self._orphans[key]
            else:
                kernel.append(orphan_form(s))
        if self.kernel is None:
            return
        start = loop.time()
        await self.kernel.apply(kernel)
        if self._on_sync is not None:
            self._on_sync(self.kernel.name, loop.time() - start)
        await self._sync_vips(remove=True)

    def _moved(self, s: Service, event: str, what: str, reason: str | None = None) -> None:
        emit(log, logging.INFO, event, f"service {s.name} {what}", service=s.name, reason=reason)

    async def _ticker(self) -> None:
        """Refresh kernel counters, finish demotions, promote services that calmed down."""
        while True:
            await asyncio.sleep(TICK)
            try:
                async with self._lock:
                    if self.kernel is not None:
                        await self.kernel.refresh()
                    await self._reconcile()
            except Exception:
                log.exception("offload reconcile failed")
