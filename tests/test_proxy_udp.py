"""The UDP relay: per-client flows, replies from the VIP, idle expiry, bounded table."""

from __future__ import annotations

import asyncio
import socket

import pytest

from lb.proxy.udp import UdpService
from lb.stats import ErrorReason
from tests.support.net import UdpBackend, balancer, eventually, free_port


def udp_svc(port: int, backends: list[str], extra: str = "", scheduler: str = "rr") -> str:
    lines = "".join(f"      - {{address: '{b}'}}\n" for b in backends) or " []\n"
    sep = "\n" if backends else ""
    return (
        f"services:\n  - name: dns\n    protocol: udp\n    listen: 127.0.0.1:{port}\n"
        f"    scheduler: {scheduler}\n{extra}    backends:{sep}{lines}"
    )


class Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, source: str = "127.0.0.1") -> Client:
        c = cls()
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: c, local_addr=(source, 0))
        return c

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.inbox.put_nowait((data, addr))

    async def ask(
        self, port: int, payload: bytes = b"q", timeout: float = 2.0
    ) -> tuple[bytes, tuple[str, int]]:
        assert self.transport is not None
        self.transport.sendto(payload, ("127.0.0.1", port))
        return await asyncio.wait_for(self.inbox.get(), timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def test_replies_come_back_from_the_service_address() -> None:
    backend = await UdpBackend("A").start()
    port = free_port(kind=socket.SOCK_DGRAM)
    async with balancer(udp_svc(port, [backend.address])):
        c = await Client.open()
        data, source = await c.ask(port, b"hello")
        assert data == b"A:hello"
        assert source == ("127.0.0.1", port)  # not the backend's address
        c.close()


async def test_one_flow_per_client_scheduled_once() -> None:
    backends = [await UdpBackend(n).start() for n in "ABC"]
    port = free_port(kind=socket.SOCK_DGRAM)
    async with balancer(udp_svc(port, [b.address for b in backends])) as lb:
        clients = [await Client.open() for _ in range(3)]
        firsts = [(await c.ask(port))[0][:1] for c in clients]
        assert firsts == [b"C", b"B", b"A"]  # rr over the kernel order C B A
        for _ in range(3):
            for c, first in zip(clients, firsts, strict=True):
                assert (await c.ask(port))[0][:1] == first
        assert lb.runtime("dns").open == 3
        rt = lb.runtime("dns")
        assert [d.inactive for d in rt.core.dests] == [1, 1, 1]  # UDP flows count as inactive
        assert rt.snapshot().totals.packets_in == 12
        for c in clients:
            c.close()


async def test_idle_flows_expire_and_are_scheduled_again() -> None:
    backends = [await UdpBackend(n).start() for n in "AB"]
    port = free_port(kind=socket.SOCK_DGRAM)
    async with balancer(
        udp_svc(port, [b.address for b in backends], "    idle_timeout: 300ms\n")
    ) as lb:
        c = await Client.open()
        assert (await c.ask(port))[0][:1] == b"B"
        await eventually(lambda: lb.runtime("dns").open == 0, timeout=3)
        assert (await c.ask(port))[0][:1] == b"A"  # a new flow: rr moved on
        assert [d.inactive for d in lb.runtime("dns").core.dests] == [0, 1]
        c.close()


async def test_flow_table_is_bounded() -> None:
    backend = await UdpBackend("A").start()
    port = free_port(kind=socket.SOCK_DGRAM)
    async with balancer(udp_svc(port, [backend.address], "    max_connections: 2\n")) as lb:
        a, b, c = [await Client.open() for _ in range(3)]
        await a.ask(port)
        await b.ask(port)
        try:
            await c.ask(port, timeout=0.3)
            raise AssertionError("a third flow got through")
        except TimeoutError:
            pass
        assert lb.runtime("dns").snapshot().totals.errors[ErrorReason.LIMIT] == 1
        assert (await a.ask(port))[0] == b"A:q"  # existing flows are unaffected
        for x in (a, b, c):
            x.close()


async def test_no_backend_drops_and_counts() -> None:
    port = free_port(kind=socket.SOCK_DGRAM)
    async with balancer(udp_svc(port, [])) as lb:
        c = await Client.open()
        try:
            await c.ask(port, timeout=0.3)
            raise AssertionError("answered without a backend")
        except TimeoutError:
            pass
        assert lb.runtime("dns").snapshot().totals.errors[ErrorReason.NO_BACKEND] == 1
        c.close()


async def test_persistence_over_udp_and_many_clients() -> None:
    backends = [await UdpBackend(n).start() for n in "AB"]
    port = free_port(kind=socket.SOCK_DGRAM)
    extra = "    persistence: {timeout: 60s}\n"
    async with balancer(udp_svc(port, [b.address for b in backends], extra)) as lb:
        clients = [await Client.open() for _ in range(6)]  # same address, different ports
        answers = {(await c.ask(port))[0][:1] for c in clients}
        assert len(answers) == 1  # one client address: one backend
        rt = lb.runtime("dns")
        assert isinstance(rt, UdpService) and len(rt.flows) == 6
        for c in clients:
            c.close()


async def test_datagrams_from_outside_allowed_sources_are_dropped() -> None:
    backend = await UdpBackend("A").start()
    port = free_port(kind=socket.SOCK_DGRAM)
    extra = "    allowed_sources: [127.0.0.2/32]\n"
    async with balancer(udp_svc(port, [backend.address], extra)) as lb:
        inside, outside = await Client.open("127.0.0.2"), await Client.open("127.0.0.3")
        assert (await inside.ask(port, b"hi"))[0] == b"A:hi"
        with pytest.raises(TimeoutError):
            await outside.ask(port, b"hi", timeout=0.5)
        rt = lb.runtime("dns")
        assert rt.counters.errors[ErrorReason.SOURCE] == 1 and rt.open == 1
        inside.close()
        outside.close()
