"""The offload manager: userspace for every service, IPVS for those that should be there,
and live moves between the two that lose no connection.

It is the dataplane the controller drives. Every service keeps its userspace listener on
VIP:port whatever carries it, so that:
- promote = add the IPVS service: new connections (SYNs) go to the kernel, connections the
  userspace listener already has keep working (IPVS ignores packets it did not schedule);
- demote = add VIP:port itself as a local destination (the kernel hands those connections
  to the listener unchanged), quiesce the NAT destinations, wait until their connections
  are gone (or `drain_timeout`), then delete the IPVS service. Deleting first would reset
  every connection the kernel carries (ipvs-reference.md).
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
from offload.host import Host, HostError, nat_paths
from offload.ipvs import IpvsDataplane
from offload.policy import Mode, OffloadPolicy, demoting_form, not_expressible, orphan_form

log = logging.getLogger("lb.offload")

TICK = 1.0


class Placement(enum.StrEnum):
    USERSPACE = "userspace"
    KERNEL = "ipvs"
    DEMOTING = "demoting"  # the kernel hands new connections back; NAT ones drain


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
        self.ipvs: IpvsDataplane | None = None
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
        ipvs: IpvsDataplane | None,
        host: Host | None,
        drain_timeout: float,
    ) -> None:
        """Set the mode before the first apply (ipvs/host None: no kernel path here)."""
        self.policy = policy
        self.ipvs = ipvs
        self.host = host
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
        kernel = {s.service.key: s for s in self.ipvs.observe()} if self.ipvs else {}
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
            if self.ipvs is not None:
                await self.ipvs.remove_all()
            if self.host is not None:
                await self.host.remove()

    # --- decisions ---------------------------------------------------------------------------

    async def _sync_vips(self, *, remove: bool) -> None:
        """Before the listeners bind: add the VIPs lb may offload. After IPVS changed: drop
        those nothing needs any more. A VIP stays while an IPVS service on it exists: the
        VIPs on the device are how lb knows which IPVS services are its own."""
        if self.host is None or self.ipvs is None:
            return
        device = self.host.device
        self._local = await self.host.local_addresses()
        held = {ip for ip, dev in self._local.items() if dev == device and not ip.is_link_local}
        wanted = {
            s.listen.ip
            for s in self._desired
            if not_expressible(s) is None and self._local.get(s.listen.ip, device) == device
        }
        wanted |= {key.listen.ip for key in self._orphans}
        wanted |= {rt.service.listen.ip for rt in self.userspace.retired} & held  # still finishing
        wanted |= {k.key.listen.ip for k in await self.ipvs.client.services()} & held
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
        if self.ipvs is not None and s.key in self.ipvs.foreign:
            return False, f"an IPVS service lb does not own already uses {s.key}"
        current = self._placement.get(s.key, Placement.USERSPACE)
        w = self.policy.want(s.key, now, current is Placement.KERNEL)
        return w.kernel, w.reason

    async def _reconcile(self) -> None:
        """Move services as the policy says, then give IPVS its desired state."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        wanted_keys = {s.key for s in self._desired}
        for key in [k for k in self._placement if k not in wanted_keys]:
            if self._placement.pop(key) is not Placement.USERSPACE and key in self._previous:
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
                emit(
                    log,
                    logging.INFO,
                    "offload.promote",
                    f"service {s.name} moves to IPVS ({reason})",
                    service=s.name,
                    reason=reason,
                )
            elif not want and current is Placement.KERNEL:
                self._placement[s.key] = Placement.DEMOTING
                self._demote_started[s.key] = now
                emit(
                    log,
                    logging.INFO,
                    "offload.demote",
                    f"service {s.name} moves back to userspace ({reason})",
                    service=s.name,
                    reason=reason,
                )
            elif current is Placement.DEMOTING and self.ipvs is not None:
                started = self._demote_started.get(s.key, now)
                if self.ipvs.drained(s.key, keep=s.listen) or now - started >= self.drain_timeout:
                    self._placement[s.key] = Placement.USERSPACE
                    self._demote_started.pop(s.key, None)
                    emit(
                        log,
                        logging.INFO,
                        "offload.demoted",
                        f"service {s.name} is back in userspace",
                        service=s.name,
                    )
            placement = self._placement.get(s.key, Placement.USERSPACE)
            if placement is Placement.KERNEL:
                kernel.append(s)
            elif placement is Placement.DEMOTING:
                kernel.append(demoting_form(s))
        for key, s in list(self._orphans.items()):
            if key in wanted_keys or (
                self.ipvs is not None and self.ipvs.has(key) and self.ipvs.drained(key)
            ):
                del self._orphans[key]
            else:
                kernel.append(orphan_form(s))
        if self.ipvs is None:
            return
        start = loop.time()
        await self.ipvs.apply(kernel)
        if self._on_sync is not None:
            self._on_sync("ipvs", loop.time() - start)
        await self._set_nat(kernel)
        await self._sync_vips(remove=True)

    async def _set_nat(self, kernel: list[Service]) -> None:
        if self.host is None:
            return
        try:
            await self.host.set_nat(nat_paths(kernel))
        except HostError as e:
            emit(
                log,
                logging.WARNING,
                "offload.nat",
                f"masquerade for local clients unavailable: {e}",
            )

    async def _ticker(self) -> None:
        """Refresh kernel counters, finish demotions, promote services that calmed down."""
        while True:
            await asyncio.sleep(TICK)
            try:
                async with self._lock:
                    if self.ipvs is not None:
                        await self.ipvs.refresh()
                    await self._reconcile()
            except Exception:
                log.exception("offload reconcile failed")
