"""The health probes on their own, against real sockets on loopback: a TCP connect and an
HTTP GET, each answering (healthy, reason) in words (tests/test_health_monitor.py runs them
through the balancer's monitors)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

from lb.health.probes import http_probe, probe, tcp_probe
from lb.model import CheckKind, Endpoint, HealthCheck
from tests.support.net import free_port


def here(port: int) -> Endpoint:
    return Endpoint.parse(f"127.0.0.1:{port}")


@pytest.fixture
def listening() -> Iterator[Endpoint]:
    """A TCP socket listening on loopback (nothing ever accepts: the kernel completes the
    handshake from the backlog)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield here(s.getsockname()[1])


@pytest.fixture
async def http_backend() -> AsyncIterator[Endpoint]:
    """A tiny HTTP backend: /ok 200, /moved 302, /bad 503, /slow answers after 5 s."""

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="fine")

    async def moved(_: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/bad"})

    async def bad(_: web.Request) -> web.Response:
        return web.Response(status=503, text="overloaded")

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/moved", moved)
    app.router.add_get("/bad", bad)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield here(port)
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_tcp_probe_connects_to_a_listening_port(listening: Endpoint) -> None:
    assert await tcp_probe(listening, 1.0) == (True, "connected")


async def test_tcp_probe_says_connection_refused_for_a_closed_port() -> None:
    # the words of strerror, not "[Errno 111] Connect call failed ('127.0.0.1', port)"
    assert await tcp_probe(here(free_port()), 1.0) == (False, "connection refused")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/ok", (True, "HTTP 200")),
        ("/moved", (True, "HTTP 302")),  # a redirect is an answer: not followed, healthy
        ("/bad", (False, "HTTP 503")),
        ("/missing", (False, "HTTP 404")),
    ],
)
async def test_http_probe_judges_by_status(
    http_backend: Endpoint,
    session: aiohttp.ClientSession,
    path: str,
    expected: tuple[bool, str],
) -> None:
    assert await http_probe(session, http_backend, path, 2.0) == expected


async def test_http_probe_gives_up_on_a_slow_answer_at_its_limit(
    http_backend: Endpoint, session: aiohttp.ClientSession
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await http_probe(session, http_backend, "/slow", 0.3) == (
        False,
        "no answer within 0.3s",
    )
    assert loop.time() - start < 2.0  # the limit, not the backend's 5 s


async def test_http_probe_to_a_closed_port_is_unhealthy_and_names_the_target(
    session: aiohttp.ClientSession,
) -> None:
    port = free_port()
    ok, reason = await http_probe(session, here(port), "/ok", 1.0)
    assert ok is False
    assert f"127.0.0.1:{port}" in reason


async def test_probe_runs_the_checks_kind_on_the_checks_port(
    http_backend: Endpoint, listening: Endpoint, session: aiohttp.ClientSession
) -> None:
    closed = here(free_port())  # the backend's own port: nothing there
    http = HealthCheck(CheckKind.HTTP, interval=1.0, timeout=1.0, rise=1, fall=1, path="/bad")
    ok, reason = await probe(http, closed, session)
    assert ok is False and str(closed) in reason  # HTTP to the backend's own port
    on_http_port = HealthCheck(CheckKind.HTTP, 1.0, 1.0, 1, 1, path="/bad", port=http_backend.port)
    assert await probe(on_http_port, closed, session) == (False, "HTTP 503")
    on_tcp_port = HealthCheck(CheckKind.TCP, 1.0, 1.0, 1, 1, port=listening.port)
    assert await probe(on_tcp_port, closed, session) == (True, "connected")
    tcp = HealthCheck(CheckKind.TCP, 1.0, 1.0, 1, 1)
    assert await probe(tcp, closed, session) == (False, "connection refused")
