"""The userspace dataplane: apply a desired set of services to listeners and relays.

The same small surface every dataplane has: `apply(desired)` (idempotent; binds what is
new, updates what changed, stops what left), `observe()` and `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterable, Sequence

from lb.changes import Changes
from lb.exhaustion import DESCRIPTORS
from lb.log import emit
from lb.model import Protocol, Service, ServiceKey
from lb.persist import Affinity
from lb.proxy.runtime import ServiceRuntime
from lb.proxy.sockets import BindError, bind_listener
from lb.proxy.tcp import TcpService
from lb.proxy.transparent import (
    RoutingError,
    SourceError,
    TransparentRouting,
    is_transparent,
    probe,
    wanted_families,
)
from lb.proxy.udp import UdpService
from lb.stats import Offload, ServiceSnapshot

log = logging.getLogger("lb.proxy")

TICK = 1.0


class ApplyError(Exception):
    """Nothing was applied: these listeners could not be bound (or, a SourceError, these
    services' `source: transparent` cannot be had)."""

    def __init__(self, errors: Sequence[BindError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in errors))


class UserspaceDataplane:
    name = "userspace"

    def __init__(self) -> None:
        self.runtimes: dict[ServiceKey, ServiceRuntime] = {}
        self.retired: list[TcpService] = []  # removed services whose connections live on
        self._tick: asyncio.TimerHandle | None = None
        # Housekeeping and rate sampling visit only the services something happened to:
        # `_due` (woken: a connection, an error, a change; until a tick finds it idle) and
        # `_quieted` (went idle since the last sampling round). Idle services cost nothing.
        self._due: set[ServiceRuntime] = set()
        self._quieted: set[ServiceRuntime] = set()
        # `source: transparent` (lb/proxy/transparent.py): the services that have it, and
        # the runtimes that had it (removed, or switched to proxy) while their transparent
        # connections last: the policy routing stays as long as either needs it
        self.routing = TransparentRouting()
        self._transparent: dict[ServiceKey, Service] = {}
        self._was_transparent: set[TcpService] = set()
        self._routing_task: asyncio.Task[None] | None = None

    async def apply(self, desired: Sequence[Service], changes: Changes) -> None:
        """Make the listeners and services match `desired`; all or nothing for new
        listeners. The work is that of `changes` (lb.changes)."""
        loop = asyncio.get_running_loop()
        ch = changes
        new = [s for s in ch.fresh if s.key not in self.runtimes]
        socks: dict[ServiceKey, socket.socket] = {}
        errors: list[BindError] = []
        transparent = self._transparent_after(ch)  # None: no service's source changed
        if transparent is not None:
            errors += self._probe(s for s in ch.fresh if s.key in transparent)
        for s in new:
            try:
                socks[s.key] = bind_listener(s.key, s.name)
            except BindError as e:
                errors.append(e)
        if not errors and transparent is not None:
            try:
                await self.routing.install(wanted_families(transparent.values()))
            except RoutingError as e:
                turning = [s for s in ch.fresh if s.key in transparent]
                for s in turning or list(transparent.values()):
                    errors.append(SourceError(s.key, s.name, str(e)))
        if errors:
            for sock in socks.values():
                sock.close()
            raise ApplyError(errors)  # nothing applied: the next apply starts from here
        for key in ch.removed:
            rt = self.runtimes.pop(key, None)
            if rt is None:
                continue
            self._due.discard(rt)
            self._quieted.discard(rt)
            rt.stop_listening()
            emit(
                log,
                logging.INFO,
                "listener.closed",
                f"service {rt.service.name} stopped listening on {key}",
                service=rt.service.name,
                listen=str(key),
            )
            if isinstance(rt, TcpService) and rt.relays:
                self.retired.append(rt)
                if key in self._transparent:
                    self._was_transparent.add(rt)
        for service in ch.fresh:
            existing = self.runtimes.get(service.key)
            if existing is not None and existing.service != service:
                if (
                    isinstance(existing, TcpService)
                    and service.key in self._transparent
                    and transparent is not None
                    and service.key not in transparent
                ):
                    self._was_transparent.add(existing)  # switched to proxy
                existing.update(service)
        for s in new:
            rt = self._make(loop, s, socks[s.key])
            rt.wake = self._wake
            rt.update(s)
            await rt.start()
            self.runtimes[s.key] = rt
            emit(
                log,
                logging.INFO,
                "listener.bound",
                f"service {s.name} listening on {s.key}",
                service=s.name,
                listen=str(s.key),
            )
        if new or ch.removed:  # listeners came or went: what the data path may use changed
            DESCRIPTORS.size()
        if transparent is not None:
            self._transparent = transparent
            await self._release_routing()
        if self._tick is None:
            self._tick = loop.call_later(TICK, self._on_tick)

    def _transparent_after(self, ch: Changes) -> dict[ServiceKey, Service] | None:
        """The transparent services once `ch` is applied, or None if it changes none (the
        work: that of the change)."""
        had = self._transparent
        if not any(is_transparent(s) or s.key in had for s in ch.fresh) and not any(
            key in had for key in ch.removed
        ):
            return None
        after = dict(had)
        for key in ch.removed:
            after.pop(key, None)
        for s in ch.fresh:
            if is_transparent(s):
                after[s.key] = s
            else:
                after.pop(s.key, None)
        return after

    def _probe(self, services: Iterable[Service]) -> list[BindError]:
        """A SourceError for each service that turns transparent where this process may
        not make transparent sockets (one probe per family)."""
        reasons: dict[int, str | None] = {}
        errors: list[BindError] = []
        for s in services:
            if s.key in self._transparent:
                continue  # already transparent: the privilege was there
            version = s.listen.ip.version
            if version not in reasons:
                reasons[version] = probe(version)
            reason = reasons[version]
            if reason is not None:
                errors.append(SourceError(s.key, s.name, reason))
        return errors

    def _routing_needs(self) -> frozenset[int]:
        """The families whose policy routing is still needed: the transparent services',
        and those of the runtimes whose transparent connections are still open."""
        for rt in [rt for rt in self._was_transparent if not rt.transparent_open()]:
            self._was_transparent.discard(rt)
        return _families(self._transparent.values()) | _families(
            rt.service for rt in self._was_transparent
        )

    async def _release_routing(self) -> None:
        """Remove the policy routing no service or connection needs any more."""
        if self.routing.installed:
            await self.routing.keep_only(self._routing_needs())

    @staticmethod
    def _make(loop: asyncio.AbstractEventLoop, s: Service, sock: socket.socket) -> ServiceRuntime:
        if s.protocol is Protocol.TCP:
            return TcpService(loop, s, sock)
        return UdpService(loop, s, sock)

    def _wake(self, rt: ServiceRuntime) -> None:
        self._due.add(rt)

    def _on_tick(self) -> None:
        loop = asyncio.get_running_loop()
        for rt in list(self._due):
            if rt.tick():
                self._due.discard(rt)
                self._quieted.add(rt)
        for rt in self.retired:
            rt.core.expire(loop.time())
        self.retired = [rt for rt in self.retired if rt.relays]
        if self._was_transparent and (self._routing_task is None or self._routing_task.done()):
            self._routing_task = loop.create_task(self._release_routing())
        self._tick = loop.call_later(TICK, self._on_tick)

    def observe(self, only: ServiceKey | None = None) -> list[ServiceSnapshot]:
        if only is None:
            return [rt.snapshot() for rt in self.runtimes.values()]
        rt = self.runtimes.get(only)
        return [rt.snapshot()] if rt is not None else []

    def explain(self, key: ServiceKey) -> Offload | None:
        """None: every service here is in userspace, nothing to explain."""
        return None

    def kernel_note(self) -> str | None:
        return None

    def active(self) -> list[ServiceSnapshot]:
        """The services whose counters may have moved since the last call (for rates)."""
        out = [snap for rt in self._due | self._quieted if (snap := rt.sample()) is not None]
        self._quieted.clear()
        return out

    def has(self, key: ServiceKey) -> bool:
        return key in self.runtimes

    def export_affinity(self, key: ServiceKey) -> list[Affinity]:
        """The service's persistence templates, for the kernel dataplane taking it over."""
        rt = self.runtimes.get(key)
        return [] if rt is None else rt.core.export_affinity(rt.loop.time())

    def seed_affinity(self, key: ServiceKey, affinities: list[Affinity]) -> int:
        """Take over the kernel's templates of a service handed back; how many."""
        rt = self.runtimes.get(key)
        if rt is None:
            return 0
        rt.wake(rt)  # housekeeping must see templates it did not make
        return rt.core.seed_affinity(affinities, rt.loop.time())

    def runtime(self, name: str) -> ServiceRuntime | None:
        for rt in self.runtimes.values():
            if rt.service.name == name:
                return rt
        return None

    @property
    def open_connections(self) -> int:
        return sum(rt.open for rt in self.runtimes.values() if isinstance(rt, TcpService)) + sum(
            len(rt.relays) for rt in self.retired
        )

    async def close(self, grace: float) -> None:
        """Stop accepting, let TCP connections finish for up to `grace` seconds, then reset."""
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        tcp = [rt for rt in self.runtimes.values() if isinstance(rt, TcpService)] + self.retired
        for rt in self.runtimes.values():
            if isinstance(rt, TcpService):
                rt.stop_listening()
        if any(rt.relays for rt in tcp):
            n = self.open_connections
            log.info(
                "waiting up to %gs for %d connection%s to finish", grace, n, "" if n == 1 else "s"
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*(rt.drained() for rt in tcp))
        left = sum(len(rt.relays) for rt in tcp)
        if left:
            log.warning("shutdown grace over: resetting %d connections", left)
        for rt in list(self.runtimes.values()) + list(self.retired):
            rt.abort_all()
        # Let the resets go out and the relays account for themselves.
        for _ in range(3):
            await asyncio.sleep(0)
        self.runtimes.clear()
        self.retired.clear()
        self._due.clear()
        self._quieted.clear()
        if self._routing_task is not None:
            await self._routing_task  # a removal under way: short, and never raises
            self._routing_task = None
        self._transparent.clear()
        self._was_transparent.clear()
        await self.routing.close()


def _families(services: Iterable[Service]) -> frozenset[int]:
    return frozenset(s.listen.ip.version for s in services)
