"""The node proxy's health over HTTP (lb/k8s/health.py decides the answers): the proxy
health server (`/healthz`, `/livez`) and one server per health-check node port, opened
and closed as syncs bring and take Services, on the addresses lb serves node ports on."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from lb.k8s.health import ProxyHealth, service_health
from lb.k8s.translate import HealthCheck
from lb.log import emit
from lb.model import Endpoint, IPAddress

log = logging.getLogger("lb.k8s")

HEADERS = {"X-Content-Type-Options": "nosniff"}


def _answer(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status, headers=HEADERS)


async def _serve(app: web.Application, addresses: Iterable[tuple[str, int]]) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        for host, port in addresses:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class HealthServers:
    def __init__(self, health: ProxyHealth, clock: Callable[[], float] = time.time) -> None:
        self.health = health
        self.clock = clock
        self.checks: dict[int, HealthCheck] = {}  # by port: what each port answers
        self._proxy: web.AppRunner | None = None
        self._ports: dict[int, tuple[web.AppRunner, tuple[IPAddress, ...]]] = {}
        self._failed: set[tuple[int, tuple[IPAddress, ...]]] = set()  # said once each

    async def start_proxy(self, address: Endpoint) -> None:
        """Serve /healthz and /livez; OSError if the address cannot be bound."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/livez", self._livez)
        self._proxy = await _serve(app, [(str(address.ip), address.port)])

    async def _healthz(self, request: web.Request) -> web.Response:
        return _answer(*self.health.healthz(self.clock()))

    async def _livez(self, request: web.Request) -> web.Response:
        return _answer(*self.health.livez(self.clock()))

    async def sync(self, checks: Iterable[HealthCheck], addresses: tuple[IPAddress, ...]) -> None:
        """Open the ports of new checks, close those of gone ones, and answer with the new
        counts. A port that cannot be bound is logged (once) and tried again next sync."""
        wanted = {c.port: c for c in checks}
        self.checks = wanted
        for port in [p for p, (_, on) in self._ports.items() if p not in wanted or on != addresses]:
            runner, _ = self._ports.pop(port)
            await runner.cleanup()
        for port, check in wanted.items():
            if port in self._ports or not addresses:
                continue
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._service_handler(port))
            try:
                runner = await _serve(app, [(str(ip), port) for ip in addresses])
            except OSError as e:
                if (port, addresses) not in self._failed:
                    self._failed.add((port, addresses))
                    emit(
                        log,
                        logging.ERROR,
                        "k8s.health_check_port_failed",
                        f"{check.service[0]}/{check.service[1]}: cannot open health-check "
                        f"node port {port}: {e.strerror or e}",
                        port=port,
                    )
                continue
            self._failed.discard((port, addresses))
            self._ports[port] = (runner, addresses)

    def _service_handler(self, port: int) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            check = self.checks.get(port)
            if check is None:  # closing
                raise web.HTTPServiceUnavailable()
            return _answer(*service_health(check, self.health.healthy(self.clock())))

        return handle

    @property
    def ports(self) -> list[int]:
        return sorted(self._ports)

    async def close(self) -> None:
        for runner, _ in self._ports.values():
            await runner.cleanup()
        self._ports.clear()
        if self._proxy is not None:
            await self._proxy.cleanup()
            self._proxy = None
