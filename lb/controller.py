"""The control loop: desired state from the config, live health from checks, runtime edits
from the admin API, into a dataplane.

Sources produce a `Config`; health monitors report UP/DOWN per backend; operators override
a backend's state or weight at run time. The controller merges the three into the
desired `Service` values and applies them, one apply at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Protocol

import aiohttp

from lb.changes import Changes
from lb.health.monitor import Monitor
from lb.log import emit
from lb.model import AdminState, Backend, Config, Endpoint, Service, ServiceKey
from lb.stats import Offload, ServiceSnapshot

log = logging.getLogger("lb.controller")

BackendKey = tuple[ServiceKey, Endpoint]


class Dataplane(Protocol):
    name: str

    async def apply(self, desired: list[Service], changes: Changes) -> None:
        """Carry exactly `desired`; `changes` says what differs from the last apply that
        went through, and is the work to do (lb.changes)."""
        ...

    def observe(self, only: ServiceKey | None = None) -> list[ServiceSnapshot]:
        """What it carries, one snapshot per service and place; `only`: that service's
        (nothing if it has none)."""
        ...

    def explain(self, key: ServiceKey) -> Offload | None:
        """Where the service is carried and why; None: this dataplane has one place only."""
        ...

    def kernel_note(self) -> str | None:
        """The kernel path in a line (`lb list`, the admin API), None: none was asked for."""
        ...

    async def close(self, grace: float) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Override:
    """A runtime edit of one backend, on top of what the config says."""

    admin: AdminState | None = None
    weight: int | None = None

    def apply(self, b: Backend) -> Backend:
        return dataclasses.replace(
            b,
            admin=b.admin if self.admin is None else self.admin,
            weight=b.weight if self.weight is None else self.weight,
        )


class EditError(Exception):
    """An admin edit that cannot be applied; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class Controller:
    def __init__(self, dataplane: Dataplane) -> None:
        self.dataplane = dataplane
        self.config = Config()
        self.monitors: dict[BackendKey, Monitor] = {}
        self.overrides: dict[BackendKey, Override] = {}
        self._lock = asyncio.Lock()
        self._dirty = False
        self._sync_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        # The desired services, in config order, each made from the config's service
        # (`_made_from`) with its overrides and health. Only the services of `_stale` are
        # made again: a health change or an edit costs one service, whatever the number of
        # services, and the others stay the very objects they were, so that a new config
        # finds its changes by identity. `_stale` None: all of them (a new config).
        self._desired: dict[ServiceKey, Service] = {}
        self._made_from: dict[ServiceKey, Service] = {}
        self._stale: set[ServiceKey] | None = None
        self._names: tuple[tuple[Service, ...], dict[str, Service]] = ((), {})

    # --- desired state ------------------------------------------------------------------

    def _configured(self, s: Service) -> list[Backend]:
        """The service's backends with runtime overrides applied (health not yet)."""
        out = []
        for b in s.backends:
            o = self.overrides.get((s.key, b.address))
            out.append(o.apply(b) if o else b)
        return out

    def _make(self, s: Service) -> Service:
        """One desired service: the config's, with its overrides and health."""
        backends: list[Backend] = []
        changed = False
        for configured in self._configured(s):
            m = self.monitors.get((s.key, configured.address))
            healthy = m.up if m is not None and m.running else True
            b = configured
            if b.healthy != healthy:
                b = dataclasses.replace(b, healthy=healthy)
            changed = changed or b is not s.backends[len(backends)]
            backends.append(b)
        return s.with_backends(tuple(backends)) if changed else s

    def service_named(self, name: str) -> Service | None:
        """The config's service of that name."""
        return self._by_name().get(name)

    def _by_name(self) -> dict[str, Service]:
        services = self.config.services
        if self._names[0] is not services:
            self._names = (services, {s.name: s for s in services})
        return self._names[1]

    def _invalidate(self, key: ServiceKey) -> None:
        if self._stale is not None:
            self._stale.add(key)

    def desired(self) -> list[Service]:
        """The services the dataplanes should carry now."""
        return list(self._build(self._stale)[0].values())

    def _build(
        self, stale: set[ServiceKey] | None
    ) -> tuple[dict[ServiceKey, Service], dict[ServiceKey, Service], list[ServiceKey]]:
        """The desired services made again where `stale` says (None: all of them), the
        config services they were made from, and the keys whose service changed."""
        previous = self._desired
        if stale is None:  # a new config: every service, in its order
            desired: dict[ServiceKey, Service] = {}
            made_from = {}
            for s in self.config.services:
                key = s.key
                made_from[key] = s
                old = previous.get(key)
                if old is not None and self._made_from.get(key) is s:
                    desired[key] = old  # the very config service: nothing to make
                    continue
                new = self._make(s)
                desired[key] = old if old == new else new
            changed = [k for k, s in desired.items() if previous.get(k) is not s]
            return desired, made_from, changed
        desired = dict(previous)
        changed = []
        for key in stale:
            source = self._made_from.get(key)
            if source is None:
                continue
            new = self._make(source)
            if new != desired[key]:
                desired[key] = new
                changed.append(key)
        return desired, self._made_from, changed

    async def _apply(self) -> None:
        """Make the desired services again where stale and give them to the dataplane; on
        failure nothing is taken as applied (what was stale stays stale)."""
        stale, self._stale = self._stale, set()
        try:
            desired, made_from, changed = self._build(stale)
            removed = [k for k in self._desired if k not in desired] if stale is None else []
            changes = Changes([desired[k] for k in changed], removed)
            await self.dataplane.apply(list(desired.values()), changes)
        except BaseException:
            self._stale = None if stale is None or self._stale is None else stale | self._stale
            raise
        previous = self._desired
        self._desired, self._made_from = desired, made_from
        self._report_changes(previous, changed)

    def _report_changes(self, previous: dict[ServiceKey, Service], keys: list[ServiceKey]) -> None:
        """One event per backend whose state or programmed weight changed, whatever the cause."""
        for key in keys:
            old = previous.get(key)
            if old is None:
                continue
            before = {b.address: b for b in old.backends}
            s = self._desired[key]
            for b in s.backends:
                was = before.get(b.address)
                if was is None:
                    continue
                then, now = (was.state, was.effective_weight), (b.state, b.effective_weight)
                if then != now:
                    emit(
                        log,
                        logging.INFO,
                        "backend.state",
                        f"backend {b.address} of service {s.name}: {then[0]} weight {then[1]}"
                        f" -> {now[0]} weight {now[1]}",
                        service=s.name,
                        backend=str(b.address),
                        state=str(now[0]),
                        weight=now[1],
                        previous_state=str(then[0]),
                        previous_weight=then[1],
                    )

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, config: Config) -> None:
        """Apply the first config; raises the dataplane's ApplyError if it cannot."""
        await self.reload(config)

    async def reload(self, config: Config) -> None:
        """Apply a new config; on ApplyError nothing changed and the old config serves on.

        Runtime overrides stay for backends that are still there."""
        async with self._lock:
            old_config, old_overrides = self.config, self.overrides
            self.config = config
            if old_overrides:  # (each sync of a node proxy comes here: no walk for none)
                by_key = {s.key: s for s in config.services}
                self.overrides = {
                    (key, address): o
                    for (key, address), o in old_overrides.items()
                    if (s := by_key.get(key)) is not None
                    and any(b.address == address for b in s.backends)
                }
            self._stale = None
            try:
                await self._apply()
            except Exception:
                self.config, self.overrides = old_config, old_overrides
                raise
            for key in old_overrides.keys() - self.overrides.keys():
                emit(
                    log,
                    logging.INFO,
                    "backend.override_dropped",
                    f"runtime edit of {key[1]} in {key[0]} dropped: the backend left the config",
                    service=str(key[0]),
                    backend=str(key[1]),
                )
            self._sync_monitors()
        # Monitors that went (or left maintenance) change the health seen above.
        self.request_sync()

    async def edit_backend(
        self,
        service: str,
        address: str,
        *,
        state: AdminState | None = None,
        weight: int | None = None,
        reset: bool = False,
    ) -> Backend:
        """A runtime edit, as if the file said so: applied whole or not at all."""
        svc = self._by_name().get(service)
        if svc is None:
            raise EditError(404, f"no service named {service!r}")
        backend = next((b for b in svc.backends if str(b.address) == address), None)
        if backend is None:
            try:
                backend = next(b for b in svc.backends if b.address == Endpoint.parse(address))
            except (ValueError, StopIteration):
                raise EditError(404, f"service {service} has no backend {address}") from None
        key = (svc.key, backend.address)
        async with self._lock:
            before = self.overrides.get(key, Override())
            after = Override() if reset else before
            if state is not None:
                after = dataclasses.replace(after, admin=state)
            if weight is not None:
                after = dataclasses.replace(after, weight=weight)
            if after == Override():
                self.overrides.pop(key, None)
            else:
                self.overrides[key] = after
            self._invalidate(svc.key)
            try:
                await self._apply()
            except Exception:
                if before == Override():
                    self.overrides.pop(key, None)
                else:
                    self.overrides[key] = before
                self._invalidate(svc.key)
                raise
            self._sync_monitors(only=svc.key)
        self.request_sync()
        return after.apply(backend)

    def _sync_monitors(self, only: ServiceKey | None = None) -> None:
        """Start, retune and stop health monitors as the config and the edits say (for
        every service, or `only` this one). A service whose monitors start or stop is made
        again at the next sync: its health as seen changes."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                headers={"User-Agent": "lb-health-check"},
            )
        wanted: dict[BackendKey, tuple[Service, Endpoint, AdminState]] = {}
        for s in self.config.services:
            if s.health_check is None or (only is not None and s.key != only):
                continue
            for b in self._configured(s):
                wanted[(s.key, b.address)] = (s, b.address, b.admin)
        for key in [k for k in self.monitors if k not in wanted and only in (None, k[0])]:
            m = self.monitors.pop(key)
            asyncio.get_running_loop().create_task(m.stop())
            self._invalidate(key[0])
        for key, (s, address, admin) in wanted.items():
            assert s.health_check is not None
            existing = self.monitors.get(key)
            if existing is None:
                m = self.monitors[key] = Monitor(
                    s.name, address, s.health_check, self._session, self._on_health(key)
                )
            else:
                m = existing
                if m.check != s.health_check:
                    m.retune(s.health_check)
            m.service = s.name
            if admin is AdminState.MAINT:
                if m.running:
                    asyncio.get_running_loop().create_task(m.stop())
                    self._invalidate(s.key)
            elif not m.running:
                m.restart_fresh()
                m.start()
                self._invalidate(s.key)

    def _on_health(self, key: BackendKey) -> Callable[[bool, str], None]:
        def changed(up: bool, reason: str) -> None:
            emit(
                log,
                logging.WARNING if not up else logging.INFO,
                "backend.health",
                f"backend {key[1]} of {key[0]} is {'UP' if up else 'DOWN'}: {reason}",
                service=str(key[0]),
                backend=str(key[1]),
                up=up,
                reason=reason,
            )
            self._invalidate(key[0])
            self.request_sync()

        return changed

    def request_sync(self) -> None:
        """Re-apply the desired state soon; many requests coalesce into one apply."""
        self._dirty = True
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = asyncio.get_running_loop().create_task(self._sync())

    async def _sync(self) -> None:
        while self._dirty:
            self._dirty = False
            async with self._lock:
                try:
                    await self._apply()
                except Exception:
                    log.exception("applying the desired state failed")

    async def shutdown(self, grace: float) -> None:
        for m in list(self.monitors.values()):
            await m.stop()
        self.monitors.clear()
        if self._sync_task is not None:
            self._sync_task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.dataplane.close(grace)
