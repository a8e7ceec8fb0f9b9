"""Real-socket helpers: tiny backends, free ports, and an in-process balancer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from lb.config import parse_config
from lb.controller import Controller
from lb.model import Config
from lb.proxy.dataplane import UserspaceDataplane
from lb.proxy.runtime import ServiceRuntime

_issued: set[tuple[str, int, int]] = set()


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing listens on, never the same one twice in a test run.

    The kernel may hand the same ephemeral port to two binds in a row once the
    first socket is closed, so a test asking for several ports before binding
    any of them would otherwise get duplicates now and then.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, kind) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if (host, kind, port) not in _issued:
            _issued.add((host, kind, port))
            return port


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class TcpBackend:
    """A backend on loopback. By default it says its name first, then echoes."""

    name: str
    host: str = "127.0.0.1"
    handler: Handler | None = None
    port: int = 0
    server: asyncio.Server | None = None
    accepted: int = 0
    peers: list[tuple[str, int]] = field(default_factory=list)
    open: int = 0

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self) -> TcpBackend:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            self.open += 1
            self.peers.append(writer.get_extra_info("peername")[:2])
            try:
                await (self.handler or self.hello_echo)(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self.open -= 1
                writer.close()

        self.server = await asyncio.start_server(handle, self.host, self.port or None)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def hello_echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{self.name}\n".encode())
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class UdpBackend(asyncio.DatagramProtocol):
    """Answers each datagram with `name:payload`."""

    def __init__(self, name: str, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.port = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.peers: list[tuple[str, int]] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> UdpBackend:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, 0))
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.peers.append(addr)
        assert self.transport is not None
        self.transport.sendto(self.name.encode() + b":" + data, addr)

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Balancer:
    controller: Controller
    dataplane: UserspaceDataplane
    config: Config

    def runtime(self, name: str) -> ServiceRuntime:
        rt = self.dataplane.runtime(name)
        assert rt is not None, name
        return rt

    async def reload(self, text: str) -> None:
        self.config = parse_config(text)
        await self.controller.reload(self.config)


@contextlib.asynccontextmanager
async def balancer(text: str) -> AsyncIterator[Balancer]:
    """`lb run` in this process: the real controller and userspace dataplane."""
    config = parse_config(text)
    dataplane = UserspaceDataplane()
    controller = Controller(dataplane)
    await controller.start(config)
    try:
        yield Balancer(controller, dataplane, config)
    finally:
        await controller.shutdown(0)


async def read_line(host: str, port: int, source: str | None = None) -> str:
    """Connect, read the first line, close."""
    reader, writer = await asyncio.open_connection(
        host, port, local_addr=(source, 0) if source else None
    )
    try:
        return (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
    finally:
        writer.close()


async def eventually(
    check: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02
) -> None:
    """Wait until `check()` is true (for state that changes asynchronously)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


async def http_exchange(host: str, port: int, request: bytes) -> tuple[int, bytes, bytes]:
    """Send raw bytes to an HTTP server, read to EOF: (status, head, body). For requests
    no client library would send (and for `Connection: close` ones)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


async def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    request = f"GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n".encode()
    status, _, body = await http_exchange(host, port, request)
    return status, body
