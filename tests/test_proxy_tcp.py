"""The TCP relay over real loopback sockets, under uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import sys

import pytest
import uvloop

from lb.proxy.tcp import HIGH_WATER, TcpService
from lb.stats import ErrorReason
from tests.support.net import TcpBackend, balancer, eventually, free_port, read_line


def svc(port: int, backends: list[str], extra: str = "", scheduler: str = "rr") -> str:
    lines = "".join(f"      - {{address: '{b}'}}\n" for b in backends)
    return (
        f"services:\n  - name: web\n    listen: 127.0.0.1:{port}\n    scheduler: {scheduler}\n"
        f"{extra}    backends:{'' if backends else ' []'}\n{lines}"
    )


async def test_runs_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_port_mapping_and_round_robin_in_kernel_order() -> None:
    backends = [await TcpBackend(n).start() for n in "ABC"]
    port = free_port()
    async with balancer(svc(port, [b.address for b in backends])):
        names = [await read_line("127.0.0.1", port) for _ in range(6)]
    # added A, B, C: the kernel's list is C B A, and rr walks it from the head
    assert names == list("CBACBA")
    assert all(b.port != port for b in backends)


async def test_bytes_arrive_intact_both_ways() -> None:
    backend = await TcpBackend("A").start()
    port = free_port()
    payload = os.urandom(3 * 1024 * 1024)
    async with balancer(svc(port, [backend.address])) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"A\n"

        async def send() -> None:
            writer.write(payload)
            await writer.drain()

        sender = asyncio.create_task(send())
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
        await sender
        assert echoed == payload
        writer.close()
        snap = lb.runtime("web").snapshot()
        await eventually(lambda: lb.runtime("web").snapshot().totals.bytes_in == len(payload))
        assert snap.backends[0].totals.bytes_out >= len(payload)


async def test_client_half_close_reaches_backend_which_can_still_reply() -> None:
    async def count_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's FIN
        writer.write(f"got {len(data)} bytes\n".encode())
        await writer.drain()

    backend = await TcpBackend("A", handler=count_until_eof).start()
    port = free_port()
    async with balancer(svc(port, [backend.address])):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x" * 100_000)
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 5)
        assert reply == b"got 100000 bytes\n"
        writer.close()


async def test_backend_half_close_reaches_client_which_can_still_send() -> None:
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def speak_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello, then FIN\n")
        writer.write_eof()
        got.set_result(await reader.read())

    backend = await TcpBackend("A", handler=speak_then_listen).start()
    port = free_port()
    async with balancer(svc(port, [backend.address])):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b"hello, then FIN\n"  # EOF seen
        writer.write(b"still talking")
        writer.write_eof()
        assert await asyncio.wait_for(got, 5) == b"still talking"
        writer.close()


async def test_backend_reset_resets_the_client_promptly() -> None:
    async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi\n")
        await writer.drain()
        await reader.readexactly(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()

    backend = await TcpBackend("A", handler=reset_after_hello).start()
    port = free_port()
    async with balancer(svc(port, [backend.address])) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"hi\n"
        writer.write(b"!")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(10), 2)
        writer.close()
        await eventually(lambda: lb.runtime("web").open == 0)
        (snap,) = lb.dataplane.observe()
        assert snap.totals.resets == 1 and snap.backends[0].totals.resets == 1
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"hi\n"
        writer.close()  # a close that is not a reset is not counted
        await eventually(lambda: lb.runtime("web").open == 0)
        assert lb.dataplane.observe()[0].totals.resets == 1


async def test_client_reset_closes_the_backend_promptly() -> None:
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def wait_for_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready\n")
        await writer.drain()
        try:
            data = await reader.read(100)
            ended.set_result("eof" if not data else "data")
        except ConnectionResetError:
            ended.set_result("reset")

    backend = await TcpBackend("A", handler=wait_for_end).start()
    port = free_port()
    async with balancer(svc(port, [backend.address])):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"ready\n"
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST
        assert await asyncio.wait_for(ended, 2) == "reset"


async def test_slow_reader_keeps_proxy_memory_bounded() -> None:
    total = 64 * 1024 * 1024
    sent = 0

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        chunk = b"z" * 65536
        while sent < total:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)

    backend = await TcpBackend("A", handler=firehose).start()
    port = free_port()
    async with balancer(svc(port, [backend.address])) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**16)
        # Do not read for a while: the backend must be held back, not buffered by lb.
        await asyncio.sleep(1.0)
        rt = lb.runtime("web")
        assert isinstance(rt, TcpService)
        (relay,) = rt.relays
        assert relay.client.transport is not None
        buffered = relay.client.transport.get_write_buffer_size()
        assert buffered <= HIGH_WATER + 256 * 1024
        assert sent < 16 * 1024 * 1024  # socket buffers plus a bounded proxy buffer
        received = 0
        while received < total:
            data = await asyncio.wait_for(reader.read(1 << 20), 10)
            assert data
            received += len(data)
        assert received == total
        writer.close()


async def test_connect_refused_is_retried_on_another_backend() -> None:
    good = await TcpBackend("B").start()
    dead = free_port()  # nothing listens there
    port = free_port()
    async with balancer(svc(port, [f"127.0.0.1:{dead}", good.address])) as lb:
        names = [await read_line("127.0.0.1", port) for _ in range(4)]
        assert names == ["B"] * 4
        snap = lb.runtime("web").snapshot()
        dead_snap = next(b for b in snap.backends if b.address.port == dead)
        assert dead_snap.totals.errors[ErrorReason.REFUSED] >= 1
        assert snap.totals.errors[ErrorReason.REFUSED] == 0  # every client got through


async def test_retries_exhausted_resets_the_client() -> None:
    ports = [free_port() for _ in range(3)]
    port = free_port()
    extra = "    retries: 1\n"
    async with balancer(svc(port, [f"127.0.0.1:{p}" for p in ports], extra)) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(10), 2)
        writer.close()
        snap = lb.runtime("web").snapshot()
        assert (
            sum(b.totals.errors[ErrorReason.REFUSED] for b in snap.backends) == 2
        )  # 1 try + 1 retry
        assert snap.totals.errors[ErrorReason.REFUSED] == 1


async def test_no_backend_refuses_at_once_with_a_reset() -> None:
    port = free_port()
    async with balancer(svc(port, [])) as lb:
        start = asyncio.get_running_loop().time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(10), 2)
        assert asyncio.get_running_loop().time() - start < 1.0
        writer.close()
        assert lb.runtime("web").snapshot().totals.errors[ErrorReason.NO_BACKEND] == 1


async def test_connect_timeout_then_retry() -> None:
    # A listener that never accepts, with its backlog full: SYNs are dropped.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    hole = blackhole.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", hole))
        fillers.append(s)
    good = await TcpBackend("B").start()
    port = free_port()
    extra = "    connect_timeout: 300ms\n"
    # list order B, hole: rr picks B first, so put the hole at the head by adding it last
    async with balancer(svc(port, [good.address, f"127.0.0.1:{hole}"], extra)) as lb:
        start = asyncio.get_running_loop().time()
        assert await read_line("127.0.0.1", port) == "B"
        elapsed = asyncio.get_running_loop().time() - start
        assert 0.25 < elapsed < 3.0
        hole_snap = next(b for b in lb.runtime("web").snapshot().backends if b.address.port == hole)
        assert hole_snap.totals.errors[ErrorReason.TIMEOUT] == 1
    for s in fillers:
        s.close()
    blackhole.close()


async def test_service_connection_limit_refuses_and_counts() -> None:
    backend = await TcpBackend("A").start()
    port = free_port()
    async with balancer(svc(port, [backend.address], "    max_connections: 2\n")) as lb:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for r, _ in held:
            assert await r.readline() == b"A\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(10), 2)
        writer.close()
        assert lb.runtime("web").snapshot().totals.errors[ErrorReason.LIMIT] == 1
        held[0][1].close()
        await eventually(lambda: lb.runtime("web").open == 1)
        assert await read_line("127.0.0.1", port) == "A"
        for _, w in held[1:]:
            w.close()


async def test_backend_upper_threshold_sends_new_connections_elsewhere() -> None:
    a, b = await TcpBackend("A").start(), await TcpBackend("B").start()
    port = free_port()
    text = (
        f"services:\n  - name: web\n    listen: 127.0.0.1:{port}\n    scheduler: rr\n    backends:\n"
        f"      - {{address: '{a.address}', max_connections: 1}}\n      - {{address: '{b.address}'}}\n"
    )
    async with balancer(text):
        # list B A; hold one connection on each, then A is at its threshold
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        assert {await r1.readline(), await r2.readline()} == {b"A\n", b"B\n"}
        assert [await read_line("127.0.0.1", port) for _ in range(3)] == ["B", "B", "B"]
        w1.close()
        w2.close()


async def test_every_backend_at_its_threshold_refuses_as_a_limit() -> None:
    a = await TcpBackend("A").start()
    port = free_port()
    text = (
        f"services:\n  - name: web\n    listen: 127.0.0.1:{port}\n    scheduler: wlc\n    backends:\n"
        f"      - {{address: '{a.address}', max_connections: 1}}\n"
    )
    async with balancer(text) as lb:
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        assert await r1.readline() == b"A\n"
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r2.read(), 2)
        errors = lb.runtime("web").snapshot().totals.errors
        assert (errors[ErrorReason.LIMIT], errors[ErrorReason.NO_BACKEND]) == (1, 0)
        w1.close()
        w2.close()


async def test_backend_process_killed_mid_stream() -> None:
    port, backend_port = free_port(), free_port()
    code = (
        "import socket, sys, time\n"
        f"s = socket.create_server(('127.0.0.1', {backend_port}))\n"
        "print('ready', flush=True)\n"
        "c, _ = s.accept()\n"
        "while True:\n"
        "    c.sendall(b'x' * 4096); time.sleep(0.01)\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"ready\n"
    async with balancer(svc(port, [f"127.0.0.1:{backend_port}"])) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert len(await asyncio.wait_for(reader.readexactly(8192), 5)) == 8192
        proc.kill()  # SIGKILL: the kernel closes the backend's socket
        await proc.wait()
        with contextlib.suppress(ConnectionResetError):  # FIN or RST: the stream must end
            while await asyncio.wait_for(reader.read(65536), 3):
                pass
        writer.close()
        await eventually(lambda: lb.runtime("web").open == 0)


async def test_idle_connections_are_closed() -> None:
    backend = await TcpBackend("A").start()
    port = free_port()
    async with balancer(svc(port, [backend.address], "    idle_timeout: 400ms\n")) as lb:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"A\n"
        start = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.3 < asyncio.get_running_loop().time() - start < 3
        writer.close()
        await eventually(lambda: lb.runtime("web").open == 0)


async def test_activity_keeps_a_connection_open_past_the_idle_timeout() -> None:
    backend = await TcpBackend("A").start()
    port = free_port()
    async with balancer(svc(port, [backend.address], "    idle_timeout: 400ms\n")):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        for _ in range(8):
            await asyncio.sleep(0.15)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 2) == b"ping"
        writer.close()


async def test_persistence_keeps_a_client_address_on_one_backend() -> None:
    backends = [await TcpBackend(n).start() for n in "ABC"]
    port = free_port()
    extra = "    persistence: {timeout: 60s}\n"
    async with balancer(svc(port, [b.address for b in backends], extra)):
        first = {
            src: await read_line("127.0.0.1", port, src)
            for src in ("127.0.0.2", "127.0.0.3", "127.0.0.4")
        }
        assert sorted(first.values()) == ["A", "B", "C"]
        for _ in range(3):
            for src, name in first.items():
                assert await read_line("127.0.0.1", port, src) == name


async def test_source_hash_on_real_client_addresses() -> None:
    backends = [await TcpBackend(n).start() for n in "ABCD"]
    port = free_port()
    async with balancer(svc(port, [b.address for b in backends], scheduler="sh")):
        order = "DCBA"
        for i in range(2, 30):
            src = f"127.0.0.{i}"
            bucket = ((int(ipaddress.IPv4Address(src)) * 0x61C88647) % 2**32) >> 24
            assert await read_line("127.0.0.1", port, src) == order[bucket % 4]


async def test_ipv6_service() -> None:
    backend = await TcpBackend("six", host="::1").start()
    port = free_port("::1")
    text = f"services:\n  - name: v6\n    listen: '[::1]:{port}'\n    backends: [{{address: '{backend.address}'}}]\n"
    async with balancer(text):
        assert await read_line("::1", port) == "six"


async def test_clients_vanishing_during_connect_leak_nothing() -> None:
    backend = await TcpBackend("A").start()
    port = free_port()
    async with balancer(svc(port, [backend.address])) as lb:
        for _ in range(200):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            writer.transport.abort()
        rt = lb.runtime("web")
        await eventually(lambda: rt.open == 0 and backend.open == 0)
        (dest,) = rt.core.dests
        assert dest.active == 0  # every scheduled connection was accounted for
        assert await read_line("127.0.0.1", port) == "A"


async def test_clients_outside_allowed_sources_are_refused() -> None:
    backend = await TcpBackend("A").start()
    port = free_port()
    extra = "    allowed_sources: [127.0.0.2/32, 10.0.0.0/8]\n"
    async with balancer(svc(port, [backend.address], extra)) as b:
        assert await read_line("127.0.0.1", port, source="127.0.0.2") == "A"
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await read_line("127.0.0.1", port, source="127.0.0.3")  # reset, never connected
        rt = b.runtime("web")
        assert rt.counters.errors[ErrorReason.SOURCE] == 1
        assert backend.accepted == 1  # the refused client never reached the backend
        # the ranges change with a reload: now everyone on 127/8
        await b.reload(svc(port, [backend.address], "    allowed_sources: [127.0.0.0/8]\n"))
        assert await read_line("127.0.0.1", port, source="127.0.0.3") == "A"
    await backend.stop()
