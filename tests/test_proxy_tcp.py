"""The TCP relay over real loopback sockets, under uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import re
import socket
import sys

import pytest
import uvloop

from lb import proxy_header
from lb.config import ConfigError, parse_config
from lb.model import ProxyProtocol, Service
from lb.proxy.tcp import HIGH_WATER, TcpService
from lb.stats import ErrorReason
from offload.policy import not_expressible
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


# --- the PROXY protocol (proxy_protocol, accept_proxy_protocol; lb/proxy_header.py) -------


async def read_proxy_header(reader: asyncio.StreamReader) -> bytes:
    """The header a backend got (either version), read as the specification frames it."""
    first = await reader.readexactly(1)
    if first == b"P":
        return first + await reader.readuntil(b"\r\n")
    fixed = first + await reader.readexactly(15)
    return fixed + await reader.readexactly(int.from_bytes(fixed[14:16], "big"))


async def header_backend(name: str, host: str = "127.0.0.1") -> tuple[TcpBackend, list[bytes]]:
    """A backend that reads a PROXY header first (kept in the list), then says its name
    and echoes."""
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await read_proxy_header(reader))
        writer.write(f"{name}\n".encode())
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    return await TcpBackend(name, host=host, handler=handler).start(), got


def packed(host: str, port: int) -> tuple[bytes, int]:
    return ipaddress.ip_address(host).packed, port


async def via_header(port: int, header: bytes, data: bytes = b"") -> tuple[bytes, bytes]:
    """Connect, send `header` then `data`; the backend's first line and the echo of data."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(header + data)
        line = await asyncio.wait_for(reader.readline(), 10)
        echo = await asyncio.wait_for(reader.readexactly(len(data)), 10)
        return line, echo
    finally:
        writer.close()


@pytest.mark.parametrize("version", [1, 2])
async def test_proxy_protocol_tells_the_backend_the_client_address(version: int) -> None:
    backend, got = await header_backend("A")
    port = free_port()
    async with balancer(svc(port, [backend.address], f"    proxy_protocol: v{version}\n")) as lb:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=("127.0.0.2", 0)
        )
        writer.write(b"early bytes")  # before the backend is there: after the header
        sport = writer.get_extra_info("sockname")[1]
        assert await asyncio.wait_for(reader.readline(), 10) == b"A\n"
        assert await asyncio.wait_for(reader.readexactly(11), 10) == b"early bytes"
        writer.write(b"later")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"later"
        writer.close()
        source, vip = packed("127.0.0.2", sport), packed("127.0.0.1", port)
        assert got == [proxy_header.encode(version, source, vip)]
        if version == 1:  # what HAProxy's send-proxy writes
            assert got[0] == f"PROXY TCP4 127.0.0.2 127.0.0.1 {sport} {port}\r\n".encode()
        rt = lb.runtime("web")
        await eventually(lambda: rt.open == 0)
        assert rt.counters.bytes_in == 16  # the client's bytes; the header is lb's own
    await backend.stop()


async def test_proxy_protocol_v1_over_ipv6() -> None:
    backend, got = await header_backend("six", host="::1")
    port = free_port("::1")
    text = (
        f"services:\n  - name: v6\n    listen: '[::1]:{port}'\n    proxy_protocol: v1\n"
        f"    backends: [{{address: '{backend.address}'}}]\n"
    )
    async with balancer(text):
        reader, writer = await asyncio.open_connection("::1", port)
        sport = writer.get_extra_info("sockname")[1]
        assert await asyncio.wait_for(reader.readline(), 10) == b"six\n"
        writer.close()
    assert got == [f"PROXY TCP6 ::1 ::1 {sport} {port}\r\n".encode()]
    await backend.stop()


@pytest.mark.parametrize("version", [1, 2])
async def test_accepted_header_is_passed_on_and_the_rest_is_data(version: int) -> None:
    backend, got = await header_backend("A")
    port = free_port()
    extra = "    accept_proxy_protocol: true\n    proxy_protocol: v2\n"
    async with balancer(svc(port, [backend.address], extra)) as lb:
        source, dest = packed("203.0.113.7", 5555), packed("198.51.100.1", 443)
        header = proxy_header.encode(version, source, dest)
        # in one segment with the first data
        assert await via_header(port, header, b"hello") == (b"A\n", b"hello")
        # and in pieces: the reader keeps what it has until the header is whole
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for piece in (header[:3], header[3:17], header[17:] + b"wor", b"ld"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)
        assert await asyncio.wait_for(reader.readline(), 10) == b"A\n"
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"world"
        writer.close()
        # lb passes on where the connection came from and went to, as HAProxy does
        assert got == [proxy_header.encode(2, source, dest)] * 2
        rt = lb.runtime("web")
        await eventually(lambda: rt.open == 0)
        assert rt.counters.errors[ErrorReason.PROXY] == 0
        assert rt.counters.bytes_in == 10
    await backend.stop()


@pytest.mark.parametrize(
    "header", [b"PROXY UNKNOWN\r\n", proxy_header.V2_SIGNATURE + b"\x20\x00\x00\x00"]
)
async def test_unknown_or_local_header_means_the_connections_own_address(header: bytes) -> None:
    backend, got = await header_backend("A")
    port = free_port()
    extra = "    accept_proxy_protocol: true\n    proxy_protocol: v1\n"
    async with balancer(svc(port, [backend.address], extra)):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=("127.0.0.3", 0)
        )
        sport = writer.get_extra_info("sockname")[1]
        writer.write(header + b"x")
        assert await asyncio.wait_for(reader.readline(), 10) == b"A\n"
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
        writer.close()
    assert got == [f"PROXY TCP4 127.0.0.3 127.0.0.1 {sport} {port}\r\n".encode()]
    await backend.stop()


async def test_source_hash_on_addresses_from_the_header() -> None:
    backends = [await TcpBackend(n).start() for n in "ABCD"]
    port = free_port()
    extra = "    accept_proxy_protocol: true\n"
    async with balancer(svc(port, [b.address for b in backends], extra, scheduler="sh")):
        order = "DCBA"  # as test_source_hash_on_real_client_addresses, from 127.0.0.1
        for i in range(2, 30):
            src = f"10.20.0.{i}"
            bucket = ((int(ipaddress.IPv4Address(src)) * 0x61C88647) % 2**32) >> 24
            header = proxy_header.encode(1, packed(src, 40000 + i), packed("127.0.0.1", port))
            line, _ = await via_header(port, header)
            assert line.decode().strip() == order[bucket % 4], src
    assert all(peer[0] == "127.0.0.1" for b in backends for peer in b.peers)  # lb's address
    for b in backends:
        await b.stop()


async def test_persistence_on_addresses_from_the_header() -> None:
    backends = [await TcpBackend(n).start() for n in "ABC"]
    port = free_port()
    extra = "    accept_proxy_protocol: true\n    persistence: {timeout: 60s}\n"
    vip = packed("127.0.0.1", port)

    def header(src: str, sport: int) -> bytes:
        return proxy_header.encode(2, packed(src, sport), vip)

    async with balancer(svc(port, [b.address for b in backends], extra)):
        sources = ("192.0.2.10", "192.0.2.11", "192.0.2.12")
        first = {src: (await via_header(port, header(src, 1000)))[0] for src in sources}
        assert sorted(first.values()) == [b"A\n", b"B\n", b"C\n"]
        for sport in range(1001, 1004):  # other ports, same addresses: same backends
            for src, name in first.items():
                assert (await via_header(port, header(src, sport)))[0] == name
    for b in backends:
        await b.stop()


async def refused_after(port: int, data: bytes, *, eof: bool) -> bytes:
    """Send `data` (then EOF if asked); what comes back before the connection ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if eof:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 20)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_missing_malformed_or_late_headers_are_refused_and_counted() -> None:
    backend = await TcpBackend("A").start()
    port = free_port()
    extra = "    accept_proxy_protocol: true\n    connect_timeout: 300ms\n"
    cases = [
        (b"GET / HTTP/1.0\r\n\r\n", False),  # no header: refused at its first byte
        (b"PROXY TCP4 192.0.2.1 nowhere 1 2\r\n", False),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2" + b" " * 100, False),  # no CRLF in 107
        (proxy_header.V2_SIGNATURE + b"\x21\x11\xff\xff", False),  # a header too long
        (b"PROXY TCP4 192.0.2.1", True),  # the client ends before the header does
        (b"", True),
        (b"", False),  # nothing at all: refused at connect_timeout
        (b"PROXY TCP4 ", False),  # a header that never ends: the same
    ]
    async with balancer(svc(port, [backend.address], extra)) as lb:
        answers = await asyncio.gather(*(refused_after(port, d, eof=e) for d, e in cases))
        assert answers == [b""] * len(cases)
        rt = lb.runtime("web")
        await eventually(lambda: rt.counters.errors[ErrorReason.PROXY] == len(cases), 10)
        await eventually(lambda: rt.open == 0)
        assert backend.accepted == 0  # none of them reached a backend
        assert rt.counters.conns == 0
        # a good one still goes through
        good = proxy_header.encode(1, packed("192.0.2.1", 1), packed("127.0.0.1", port))
        assert await via_header(port, good, b"ok") == (b"A\n", b"ok")
    await backend.stop()


async def test_random_bytes_never_hurt_the_listener() -> None:
    """Fuzzed first bytes against a live service: each connection is refused or relayed,
    nothing is left open, and the service goes on serving."""
    backend = await TcpBackend("A").start()
    port = free_port()
    extra = "    accept_proxy_protocol: true\n    connect_timeout: 2s\n"
    rng = random.Random(0x9C0FFEE)
    good = proxy_header.encode(2, packed("192.0.2.1", 1), packed("127.0.0.1", port))
    starts = [b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", proxy_header.V2_SIGNATURE, good]
    inputs = []
    for _ in range(120):
        tail = rng.randbytes(rng.randrange(0, 200))
        start = rng.choice(starts)
        cut = rng.randrange(0, len(start) + 1)
        inputs.append(start[:cut] + tail)
    async with balancer(svc(port, [backend.address], extra)) as lb:
        for batch in range(0, len(inputs), 30):
            await asyncio.gather(
                *(refused_after(port, d, eof=True) for d in inputs[batch : batch + 30])
            )
        rt = lb.runtime("web")
        await eventually(lambda: rt.open == 0, 20)
        refused = rt.counters.errors[ErrorReason.PROXY]
        assert refused + rt.counters.conns == len(inputs)
        assert refused > 0
        assert await via_header(port, good, b"still") == (b"A\n", b"still")
    await backend.stop()


def test_proxy_protocol_settings_and_their_errors() -> None:
    def one(extra: str) -> Service:
        text = f"services:\n  - {{name: a, listen: 10.0.0.1:80, retries: 0{extra}}}\n"
        return parse_config(text).services[0]

    s = one(", proxy_protocol: v2, accept_proxy_protocol: true")
    assert (s.proxy_protocol, s.accept_proxy_protocol) == (ProxyProtocol.V2, True)
    assert (one("").proxy_protocol, one("").accept_proxy_protocol) == (None, False)
    assert not_expressible(one("")) is None
    for extra in (", proxy_protocol: v1", ", accept_proxy_protocol: true"):
        assert "PROXY protocol" in str(not_expressible(one(extra)))  # `lb offload plan`
    for extra, message in (
        (", proxy_protocol: v3", "services[0].proxy_protocol: must be one of 'v1' or 'v2'"),
        (", accept_proxy_protocol: 1", "services[0].accept_proxy_protocol:"),
        (
            ", protocol: udp, proxy_protocol: v1",
            "services[0].proxy_protocol: the PROXY protocol is for tcp services only",
        ),
        (
            ", protocol: udp, accept_proxy_protocol: true",
            "services[0].accept_proxy_protocol: the PROXY protocol is for tcp services only",
        ),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            one(extra)


async def test_reload_turns_the_proxy_protocol_on_and_shutdown_ends_a_header_wait() -> None:
    backend, got = await header_backend("A")
    port = free_port()
    plain = await TcpBackend("P").start()
    async with balancer(svc(port, [plain.address])) as lb:
        assert await read_line("127.0.0.1", port) == "P"
        extra = "    accept_proxy_protocol: true\n    proxy_protocol: v1\n"
        await lb.reload(svc(port, [backend.address], extra))
        header = proxy_header.encode(1, packed("192.0.2.9", 9), packed("127.0.0.1", port))
        assert await via_header(port, header, b"z") == (b"A\n", b"z")
        assert got == [header]
        rt = lb.runtime("web")
        # a client that never sends its header is still waited for at shutdown
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await eventually(lambda: rt.open == 1)
    assert rt.open == 0  # reset at shutdown, not counted as a bad header
    assert rt.counters.errors[ErrorReason.PROXY] == 0
    writer.close()
    await backend.stop()
    await plain.stop()
