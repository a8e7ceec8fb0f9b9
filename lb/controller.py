"""The control loop: desired state from the config, live health from checks, into a dataplane.

Sources produce a `Config`; health monitors report UP/DOWN per backend; the controller
merges both into the desired `Service` values and applies them, one apply at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Protocol

import aiohttp

from lb.health.monitor import Monitor
from lb.log import emit
from lb.model import AdminState, Config, Endpoint, Service, ServiceKey

log = logging.getLogger("lb.controller")

MonitorKey = tuple[ServiceKey, Endpoint]


class Dataplane(Protocol):
    name: str

    async def apply(self, desired: list[Service]) -> None: ...

    async def close(self, grace: float) -> None: ...


class Controller:
    def __init__(self, dataplane: Dataplane) -> None:
        self.dataplane = dataplane
        self.config = Config()
        self.monitors: dict[MonitorKey, Monitor] = {}
        self._lock = asyncio.Lock()
        self._dirty = False
        self._sync_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    # --- desired state ------------------------------------------------------------------

    def desired(self) -> list[Service]:
        out = []
        for s in self.config.services:
            backends = []
            for b in s.backends:
                m = self.monitors.get((s.key, b.address))
                healthy = m.up if m is not None and m.running else True
                backends.append(
                    b if b.healthy == healthy else dataclasses.replace(b, healthy=healthy)
                )
            out.append(s.with_backends(tuple(backends)))
        return out

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, config: Config) -> None:
        """Apply the first config; raises the dataplane's ApplyError if it cannot."""
        await self.reload(config)

    async def reload(self, config: Config) -> None:
        """Apply a new config; on ApplyError nothing changed and the old config serves on."""
        async with self._lock:
            old = self.config
            self.config = config
            try:
                await self.dataplane.apply(self.desired())
            except Exception:
                self.config = old
                raise
            self._sync_monitors()
        # Monitors that went (or left maintenance) change the health seen above.
        self.request_sync()

    def _sync_monitors(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                headers={"User-Agent": "lb-health-check"},
            )
        wanted: dict[MonitorKey, tuple[Service, Endpoint, AdminState]] = {}
        for s in self.config.services:
            if s.health_check is None:
                continue
            for b in s.backends:
                wanted[(s.key, b.address)] = (s, b.address, b.admin)
        for key in [k for k in self.monitors if k not in wanted]:
            m = self.monitors.pop(key)
            asyncio.get_running_loop().create_task(m.stop())
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
            elif not m.running:
                m.restart_fresh()
                m.start()

    def _on_health(self, key: MonitorKey) -> Callable[[bool, str], None]:
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
                    await self.dataplane.apply(self.desired())
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
