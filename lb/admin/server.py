"""The admin HTTP API (aiohttp): health, readiness, metrics, state, and runtime edits.

Safe by default: loopback only unless the config says `allow_remote` (which needs a
token); every mutation is a POST and needs the bearer token when one is configured;
bodies are small and bounded; slow or idle clients are cut off; every error is a JSON
body with a 4xx status, and no request can take the balancer down.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from lb.admin.view import backend_json, service_json
from lb.controller import Controller, EditError
from lb.metrics import Metrics
from lb.model import AdminSettings, AdminState, ServiceKey
from lb.proxy.sockets import explain_bind_error
from lb.rates import RateEstimator

log = logging.getLogger("lb.admin")

MAX_BODY = 16 * 1024
REQUEST_TIMEOUT = 10.0  # a whole request, body included
IDLE_TIMEOUT = 10.0  # an idle or never-finished keep-alive connection


class AdminSetupError(Exception):
    """The admin API cannot start (bind failure, unreadable token file)."""


class Readiness:
    """Ready once the config is loaded, every listener bound and every source synced."""

    def __init__(self) -> None:
        self.reason: str | None = "starting: the first sync is not done"

    @property
    def ready(self) -> bool:
        return self.reason is None

    def set_ready(self) -> None:
        self.reason = None

    def set_not_ready(self, reason: str) -> None:
        self.reason = reason


class EditIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    state: Literal["ready", "drain", "maint"] | None = None
    weight: Annotated[int, Strict(), Field(ge=0, le=65535)] | None = None
    reset: Annotated[bool, Strict()] = False


def read_token(settings: AdminSettings) -> str | None:
    if settings.token_file is None:
        return None
    try:
        token = Path(settings.token_file).read_text().strip()
    except OSError as e:
        raise AdminSetupError(
            f"cannot read admin.token_file {settings.token_file}: {e.strerror}"
        ) from None
    if not token:
        raise AdminSetupError(f"admin.token_file {settings.token_file} is empty")
    return token


def bind_admin(settings: AdminSettings) -> socket.socket:
    ep = settings.listen
    sock = socket.socket(socket.AF_INET if ep.family == 4 else socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(ep.sockaddr())
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise AdminSetupError(
            f"cannot listen on {ep} for the admin API: {explain_bind_error(e, ep)}"
        ) from None
    return sock


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status, headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _JsonErrorHandler(RequestHandler):
    """aiohttp answers what its HTTP parser refuses (an oversized header, an unknown
    method, a bad Content-Length, ...) in plain text and logs a traceback each time: a
    client's mistake gets a JSON 4xx like every other error, and a debug line."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        log.debug("admin: refused a malformed request (%s): %s", status, message)
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun: cannot send the error")
        reason = " ".join((message or "").split()) or "the request is malformed"
        response = _error(status, reason)
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class AdminServer:
    def __init__(
        self,
        *,
        settings: AdminSettings,
        controller: Controller,
        metrics: Metrics,
        rates: RateEstimator,
        readiness: Readiness,
        token: str | None,
    ) -> None:
        self.settings = settings
        self.controller = controller
        self.metrics = metrics
        self.rates = rates
        self.readiness = readiness
        self.token = token
        self._token = (token or "").encode()  # compared as bytes, in constant time
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard, self._auth])
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics_text)
        r.add_get("/api/v1/services", self.services)
        r.add_get("/api/v1/services/{service}", self.service)
        r.add_post("/api/v1/services/{service}/backends/{address}", self.edit)
        return app

    async def start(self, sock: socket.socket) -> None:
        self._runner = web.AppRunner(
            self.app(),
            access_log=None,
            keepalive_timeout=IDLE_TIMEOUT,
            handle_signals=False,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        server.__class__ = _JsonErrorServer  # the runner made it; only its handlers change
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- middlewares ---------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every failure becomes a JSON error; nothing escapes, nothing runs forever."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else {}
            return _error(e.status, e.reason, **headers)
        except TimeoutError:
            return _error(408, "the request took too long")
        except ConnectionError as e:  # a body cut short by the client: its mistake, not lb's
            log.debug("admin: %s %s ended early: %s", request.method, request.path, e)
            return _error(400, "the request ended before its body did")
        except Exception:
            log.exception("admin request %s %s failed", request.method, request.path)
            return _error(500, "internal error (logged)")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and self.token is not None:
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            given_token = value.strip().encode("utf-8", "surrogateescape")  # any bytes
            if scheme.lower() != "bearer" or not hmac.compare_digest(given_token, self._token):
                return _error(401, "a bearer token is required", **{"WWW-Authenticate": "Bearer"})
        return await handler(request)

    # --- read side -----------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.readiness.ready:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reason": self.readiness.reason}, status=503)

    async def metrics_text(self, request: web.Request) -> web.StreamResponse:
        """Built without holding the event loop for long (lb/metrics.py), then written
        part by part (no copy of the whole page)."""
        parts = await self.metrics.page()
        response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE_LATEST})
        response.content_length = sum(len(p) for p in parts)
        await response.prepare(request)
        for part in parts:
            await response.write(part)
        await response.write_eof()
        return response

    def _services(self, only: ServiceKey | None = None) -> list[dict[str, Any]]:
        c = self.controller
        out = []
        for s in c.dataplane.observe(only):
            o = c.dataplane.explain(s.service.key)
            offload = None if o is None else (str(o.placement), o.reason)
            out.append(service_json(s, c.monitors, c.overrides, self.rates, offload))
        return out

    async def services(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"services": self._services(), "kernel": self.controller.dataplane.kernel_note()}
        )

    async def service(self, request: web.Request) -> web.Response:
        name = request.match_info["service"]
        svc = self.controller.service_named(name)
        for s in self._services(only=svc.key if svc is not None else None):
            if s["name"] == name:
                return web.json_response(s)
        return _error(404, f"no service named {name!r}")

    # --- write side ----------------------------------------------------------------------

    async def edit(self, request: web.Request) -> web.Response:
        service = request.match_info["service"]
        address = request.match_info["address"]
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _error(413, f"the body is over {MAX_BODY} bytes")
        raw = await request.read()
        try:
            data = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"the body is not JSON: {e}")
        except RecursionError:
            return _error(400, "the body is not JSON lb takes: nested too deeply")
        if not isinstance(data, dict):
            return _error(
                400, 'the body must be a JSON object, e.g. {"state": "drain"} or {"weight": 2}'
            )
        try:
            edit = EditIn.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}"
                for err in e.errors()
            )
            return _error(400, problems)
        if edit.state is None and edit.weight is None and not edit.reset:
            return _error(400, 'nothing to change: give "state", "weight" or "reset": true')
        try:
            backend = await self.controller.edit_backend(
                service,
                address,
                state=AdminState(edit.state) if edit.state else None,
                weight=edit.weight,
                reset=edit.reset,
            )
        except EditError as e:
            return _error(e.status, str(e))
        c = self.controller
        svc = c.service_named(service)
        for snap in c.dataplane.observe(svc.key) if svc is not None else []:
            if snap.service.name == service:
                for b in snap.backends:
                    if b.address == backend.address:
                        return web.json_response(
                            backend_json(snap, b, c.monitors, c.overrides, self.rates)
                        )
        return web.json_response({"address": str(backend.address), "applied": True})
