"""Active health checks over real sockets, and admin states applied by a reload."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from lb.model import BackendState
from tests.support.net import TcpBackend, balancer, eventually, free_port, read_line

FAST_TCP = "    health_check: {type: tcp, interval: 100ms, timeout: 100ms, rise: 2, fall: 2}\n"


def config(port: int, backends: list[str], extra: str = FAST_TCP) -> str:
    lines = "".join(f"      - {b}\n" for b in backends)
    return f"services:\n  - name: web\n    listen: 127.0.0.1:{port}\n    scheduler: rr\n{extra}    backends:\n{lines}"


def states(lb: object) -> dict[int, BackendState | None]:
    snap = lb.runtime("web").snapshot()  # type: ignore[attr-defined]
    return {b.address.port: b.backend.state if b.backend else None for b in snap.backends}


async def test_tcp_check_takes_a_dead_backend_out_and_back_in() -> None:
    a = await TcpBackend("A").start()
    b_port = free_port()
    port = free_port()
    async with balancer(
        config(port, [f"{{address: '{a.address}'}}", f"{{address: '127.0.0.1:{b_port}'}}"])
    ) as lb:
        await eventually(lambda: states(lb)[b_port] is BackendState.DOWN)
        assert [await read_line("127.0.0.1", port) for _ in range(4)] == ["A"] * 4
        b = await TcpBackend("B", port=b_port).start()
        await eventually(lambda: states(lb)[b_port] is BackendState.UP)
        assert {await read_line("127.0.0.1", port) for _ in range(4)} == {"A", "B"}
        await b.stop()


async def test_http_check_uses_path_and_status() -> None:
    status = {"code": 200}
    hits: list[str] = []

    async def healthz(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=status["code"], headers={"Location": "/"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    check_port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", check_port)
    await site.start()
    a = await TcpBackend("A").start()
    port = free_port()
    check = (
        "    health_check: {type: http, path: /healthz, interval: 100ms, timeout: 100ms, "
        f"rise: 1, fall: 1, port: {check_port}}}\n"
    )
    try:
        async with balancer(config(port, [f"{{address: '{a.address}'}}"], check)) as lb:
            await eventually(lambda: len(hits) >= 2)
            assert set(hits) == {"/healthz"}
            assert states(lb)[a.port] is BackendState.UP
            status["code"] = 503
            await eventually(lambda: states(lb)[a.port] is BackendState.DOWN)
            status["code"] = 302  # 3xx counts as healthy
            await eventually(lambda: states(lb)[a.port] is BackendState.UP)
    finally:
        await runner.cleanup()


async def test_down_backend_gets_no_new_connections_but_keeps_established_ones() -> None:
    b = await TcpBackend("B").start()
    a = await TcpBackend("A").start()
    app_port = free_port()
    # HTTP check against a tiny server we can flip; the data port stays open throughout.
    flip = {"code": 200}

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=flip["code"])

    app = web.Application()
    app.router.add_get("/", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", app_port).start()
    port = free_port()
    check = f"    health_check: {{type: http, interval: 100ms, timeout: 100ms, rise: 1, fall: 1, port: {app_port}}}\n"
    try:
        async with balancer(
            config(port, [f"{{address: '{a.address}'}}", f"{{address: '{b.address}'}}"], check)
        ) as lb:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await reader.readline() == b"B\n"  # list B A: rr starts at B
            flip["code"] = 500
            await eventually(lambda: all(s is BackendState.DOWN for s in states(lb).values()))
            # both DOWN (same check server): new clients are refused...
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r2.read(), 2)
            w2.close()
            # ...while the established connection still relays.
            writer.write(b"still here")
            assert await asyncio.wait_for(reader.readexactly(10), 2) == b"still here"
            writer.close()
    finally:
        await runner.cleanup()


async def test_drain_and_maint_by_reload() -> None:
    a, b = await TcpBackend("A").start(), await TcpBackend("B").start()
    port = free_port()
    base = [f"{{address: '{a.address}'}}", f"{{address: '{b.address}'}}"]
    async with balancer(config(port, base, "")) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"B\n"
        await lb.reload(config(port, [base[0], f"{{address: '{b.address}', state: drain}}"], ""))
        assert states(lb)[b.port] is BackendState.DRAIN
        assert [await read_line("127.0.0.1", port) for _ in range(3)] == ["A"] * 3
        writer.write(b"draining")  # the drained backend's connection carries on
        assert await asyncio.wait_for(reader.readexactly(8), 2) == b"draining"
        await lb.reload(
            config(port, [base[0], f"{{address: '{b.address}', state: maint}}"], FAST_TCP)
        )
        assert states(lb)[b.port] is BackendState.MAINT
        assert not lb.controller.monitors[
            (lb.config.services[0].key, lb.config.services[0].backends[1].address)
        ].running
        await lb.reload(config(port, base, FAST_TCP))
        assert states(lb)[b.port] is BackendState.UP
        assert {await read_line("127.0.0.1", port) for _ in range(4)} == {"A", "B"}
        writer.close()


async def test_removed_backend_drains_then_goes() -> None:
    a, b = await TcpBackend("A").start(), await TcpBackend("B").start()
    port = free_port()
    async with balancer(
        config(port, [f"{{address: '{a.address}'}}", f"{{address: '{b.address}'}}"], "")
    ) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"B\n"
        await lb.reload(config(port, [f"{{address: '{a.address}'}}"], ""))
        snap = {x.address.port: x for x in lb.runtime("web").snapshot().backends}
        assert snap[b.port].backend is None and snap[b.port].weight == 0
        assert [await read_line("127.0.0.1", port) for _ in range(3)] == ["A"] * 3
        writer.write(b"bye")
        assert await reader.readexactly(3) == b"bye"
        writer.close()
        rt = lb.runtime("web")
        await eventually(lambda: rt.open == 0)
        dest = rt.core.find(snap[b.port].address)
        assert dest is not None and dest.inactive >= 1  # in TIME_WAIT: not deleted yet
        for d in rt.core.dests:  # let TIME_WAIT pass for the core
            d._lingering = None
            d.inactive = 0
        rt.tick()
        assert rt.core.find(snap[b.port].address) is None


async def test_removing_the_health_check_by_reload_brings_backends_back() -> None:
    a = await TcpBackend("A").start()
    dead = free_port()
    port = free_port()
    backends = [f"{{address: '{a.address}'}}", f"{{address: '127.0.0.1:{dead}'}}"]
    async with balancer(config(port, backends)) as lb:
        await eventually(lambda: states(lb)[dead] is BackendState.DOWN)
        await lb.reload(config(port, backends, ""))
        await eventually(lambda: states(lb)[dead] is BackendState.UP)
        assert not lb.controller.monitors
