"""Traffic for namespace tests, natively and in the kernel tier: backends that say who
they saw, clients that ask from a given address, and `lb run` in the balancer's namespace.

Backends answer with "<their address> saw <peer address>": through kernel NAT the peer is
the client itself, through the userspace proxy it is the balancer (LB_SIDE), so every
answer says which path carried it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from lb.model import AdminState, Backend, Service
from offload.netns import inside
from tests.support.netns import LB_SIDE, Topology, socket_in
from tests.support.proc import LbProcess

#: Python in the guest reads every module over 9p under emulation: lb takes ~30 s to start.
START = 150.0


class Backends:
    """TCP and UDP servers on every backend address, in the backend namespace."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.servers: list[asyncio.Server] = []
        self.udp: list[asyncio.DatagramTransport] = []
        self.tcp_port = 8080
        self.udp_port = 5353

    async def start(self) -> Backends:
        loop = asyncio.get_running_loop()
        for ip in self.topo.backend_ips:

            async def handle(
                r: asyncio.StreamReader, w: asyncio.StreamWriter, ip: str = ip
            ) -> None:
                peer = w.get_extra_info("peername")[0]
                try:
                    w.write(f"{ip} saw {peer}\n".encode())
                    await w.drain()
                    while data := await r.read(65536):
                        w.write(data)
                        await w.drain()
                except ConnectionError:
                    pass
                finally:
                    w.close()

            sock = socket_in(self.topo.backends)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, self.tcp_port))
            self.servers.append(await asyncio.start_server(handle, sock=sock, backlog=1024))

            class Echo(asyncio.DatagramProtocol):
                def __init__(self, ip: str = ip) -> None:
                    self.ip = ip

                def connection_made(self, t: asyncio.BaseTransport) -> None:
                    self.t: Any = t

                def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                    self.t.sendto(f"{self.ip} saw {addr[0]}:".encode() + data, addr)

            usock = socket_in(self.topo.backends, socket.SOCK_DGRAM)
            usock.bind((ip, self.udp_port))
            t, _ = await loop.create_datagram_endpoint(Echo, sock=usock)
            self.udp.append(t)
        return self

    def close(self) -> None:
        for s in self.servers:
            s.close()
        for t in self.udp:
            t.close()


async def client_conn(
    topo: Topology, source: str, port: int = 80, sport: int = 0, vip: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket_in(topo.client)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((source, sport))
    sock.setblocking(False)
    to = (vip or topo.vip, port)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, to), 10)
    return await asyncio.open_connection(sock=sock)


async def connects(
    topo: Topology, source: str, port: int = 80, ns: str | None = None, timeout: float = 0.5
) -> bool:
    """Whether a TCP connection from `source` (in the client namespace, or `ns`) to the
    VIP is answered within `timeout`: False for a SYN dropped (no answer, not a refusal,
    which raises ConnectionRefusedError)."""
    sock = socket_in(ns or topo.client)
    sock.bind((source, 0))
    sock.setblocking(False)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, (topo.vip, port)), timeout
        )
    except TimeoutError:
        return False
    finally:
        sock.close()
    return True


async def ask(
    topo: Topology, source: str, port: int = 80, sport: int = 0, vip: str | None = None
) -> str:
    """Connect from `source` (to the topology's VIP, or `vip`), read the backend's line
    ("<backend> saw <peer>"), close."""
    reader, writer = await client_conn(topo, source, port, sport, vip)
    try:
        return (await asyncio.wait_for(reader.readline(), 10)).decode().strip()
    finally:
        writer.close()


async def ask_udp(
    topo: Topology, source: str, payload: bytes, port: int = 53
) -> tuple[bytes, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    sock = socket_in(topo.client, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    got: asyncio.Future[tuple[bytes, tuple[str, int]]] = loop.create_future()

    class P(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not got.done():
                got.set_result((data, addr))

    t, _ = await loop.create_datagram_endpoint(P, sock=sock)
    try:
        t.sendto(payload, (topo.vip, port))
        return await asyncio.wait_for(got, 10)
    finally:
        t.close()


def service_yaml(
    name: str, port: int, backends: list[str], extra: str = "", proto: str = "tcp"
) -> str:
    lines = "".join(f"      - {b}\n" for b in backends) if backends else "      []\n"
    return (
        f"  - name: {name}\n    protocol: {proto}\n    listen: 10.99.0.10:{port}\n{extra}"
        f"    backends:\n{lines}"
    )


ADMIN_PORT = 9090  # inside the balancer's own namespace: nothing else is there


def config_yaml(services: list[str], dataplane: str, extra: str = "") -> str:
    return (
        f"dataplane: {dataplane}\nshutdown_grace: 2s\nadmin: {{listen: 127.0.0.1:{ADMIN_PORT}}}\n"
        f"{extra}services:" + ("\n" + "".join(services) if services else " []\n")
    )


@contextlib.asynccontextmanager
async def running_lb(
    topo: Topology, cfg: Path, *, expect_start: bool = True
) -> AsyncIterator[LbProcess]:
    lb = await LbProcess.start(cfg, prefix=["ip", "netns", "exec", topo.lb])
    try:
        if expect_start:
            await lb.wait_event("lb.started", timeout=START)
        yield lb
    finally:
        await lb.stop()


async def admin(topo: Topology, lb: LbProcess, method: str, path: str, body: Any = None) -> Any:
    """Call lb's admin API, which listens on the balancer namespace's loopback."""
    started = next(e for e in lb.events if e.get("event") == "lb.started")
    host, port = started["admin"].rsplit(":", 1)
    with inside(topo.lb):
        sock = socket.create_connection((host, int(port)))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    data = json.dumps(body).encode() if body is not None else b""
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: lb\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + data
    )
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


# --- promote and demote under load (the kernel tier with IPVS, natively with nftables) ---


HANDOFF_BACKENDS = [
    "{address: 10.99.2.2:8080, weight: W}",
    "{address: 10.99.2.3:8080}",
    "{address: 10.99.2.4:8080}",
]


def handoff_config(weight: int, persistent: bool = False) -> str:
    web = service_yaml(
        "web",
        80,
        [b.replace("W", str(weight)) for b in HANDOFF_BACKENDS],
        "    scheduler: wrr\n    retries: 0\n"
        + ("    persistence: {timeout: 300s}\n" if persistent else ""),
    )
    return config_yaml(
        [web], "auto", "offload: {hold_down: 5s, churn_limit: 3, drain_timeout: 60s}\n"
    )


class Load:
    """Clients opening short connections in a loop, each checking its echo byte for byte."""

    def __init__(self, topo: Topology, workers: int = 3) -> None:
        self.topo = topo
        self.workers = workers
        self.ok = 0
        self.failed: list[str] = []
        self.paths: list[str] = []  # "kernel" (the backend saw the client) or "userspace"
        self.backends: dict[str, set[str]] = {}  # by client address: the backends it got
        self.started = time.monotonic()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def through(self, path: str, timeout: float = 30.0) -> None:
        """Wait until a new connection went through `path` ("kernel" or "userspace")."""
        seen = len(self.paths)
        deadline = asyncio.get_running_loop().time() + timeout
        while path not in self.paths[seen:]:
            assert asyncio.get_running_loop().time() < deadline, f"no connection via {path}"
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self._tasks = [
            asyncio.get_running_loop().create_task(self._worker(i)) for i in range(self.workers)
        ]

    async def _worker(self, i: int) -> None:
        source = self.topo.client_ips[i]
        while not self._stop.is_set():
            payload = os.urandom(4096)
            stage = "connect"
            began = time.monotonic() - self.started
            try:
                reader, writer = await client_conn(self.topo, source)
                stage = "greeting"
                line = (await asyncio.wait_for(reader.readline(), 10)).decode()
                writer.write(payload)
                stage = "echo"
                echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
                writer.close()
                if echoed != payload:
                    self.failed.append("corrupted echo")
                    continue
                self.paths.append("userspace" if line.split()[-1] == LB_SIDE else "kernel")
                self.backends.setdefault(source, set()).add(line.split()[0])
                self.ok += 1
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                self.failed.append(
                    f"{source} began at {began:.2f}s, {stage}: {type(e).__name__}: {e}"
                )

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


class Stream:
    """A long-lived connection that keeps sending and checks every byte that comes back."""

    def __init__(self, topo: Topology, source: str) -> None:
        self.topo = topo
        self.source = source
        self.sent = self.received = 0
        self.error: str | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            reader, writer = await client_conn(self.topo, self.source)
            await reader.readline()
            n = 0
            while not self._stop.is_set():
                chunk = bytes([n % 251]) * 2048
                writer.write(chunk)
                self.sent += len(chunk)
                back = await asyncio.wait_for(reader.readexactly(len(chunk)), 10)
                if back != chunk:
                    self.error = "corrupted"
                    return
                self.received += len(back)
                n += 1
                await asyncio.sleep(0.05)
            writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            self.error = f"{type(e).__name__}: {e}"

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def promote_and_demote_under_load(
    topo: Topology, tmp_path: Path, *, persistent: bool = False
) -> None:
    """The service starts in userspace, is promoted once stable, demoted by churn and
    promoted again, all under continuous load: zero failed connections, zero lost bytes
    (dataplane auto: IPVS where the kernel has it, nftables elsewhere). `persistent`:
    with client-IP persistence, every client keeps its backend through every move."""
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(handoff_config(1, persistent))
    async with running_lb(topo, cfg) as lb:
        load = Load(topo, workers=6 if persistent else 3)
        load.start()
        in_user = Stream(topo, topo.client_ips[10])  # opened while userspace carries the service
        in_user.start()
        await lb.wait_event("offload.promote", timeout=60)
        await load.through("kernel")  # the move is logged before the kernel write is done
        in_kernel = Stream(topo, topo.client_ips[11])  # opened while the kernel carries it
        in_kernel.start()
        await asyncio.sleep(2)
        await in_user.stop()  # the userspace connection lived through the promotion
        # churn: three changes within hold_down send the service back to userspace
        n = len(lb.events)
        for weight in (2, 3, 4):
            cfg.write_text(handoff_config(weight, persistent))
            lb.signal(signal.SIGHUP)
            await lb.wait_event("config.reloaded", after=n)
            n = len(lb.events)
        demote = await lb.wait_event("offload.demote", timeout=30)
        n = lb.events.index(demote)
        await asyncio.sleep(2)
        await in_kernel.stop()  # the kernel connection lived through the demotion
        await lb.wait_event("offload.demoted", timeout=60, after=n)
        # calm again: promoted once demoted (at once if it was calm long enough by then)
        await lb.wait_event("offload.promote", timeout=60, after=n)
        await load.through("kernel")
        await asyncio.sleep(1)
        await load.stop()
    assert load.failed == [], "\n".join(load.failed[:5]) + "\n" + lb.timeline(load.started)
    assert in_user.error is None and in_user.sent == in_user.received > 0
    assert in_kernel.error is None and in_kernel.sent == in_kernel.received > 0
    assert load.ok > 50
    # both paths carried traffic, and the last connections went through the kernel again
    assert "userspace" in load.paths and "kernel" in load.paths and load.paths[-1] == "kernel"
    if persistent:  # no client was scheduled afresh by the path taking over
        moved = {src: got for src, got in load.backends.items() if len(got) > 1}
        assert not moved, f"{moved}\n" + lb.timeline(load.started)
        carried = [e["msg"] for e in lb.events if e.get("event") == "offload.affinity"]
        assert any("to userspace" in m for m in carried), lb.timeline(load.started)
        assert sum("templates moved to" in m and "userspace" not in m for m in carried) >= 2


def leaving(service: Service, victim: str) -> list[tuple[Backend, ...]]:
    """The service's backends as one of them (the backend at address `victim`) is drained,
    then goes DOWN, then is removed from the config: what the kernel paths must follow
    without ending the established flows of the others."""
    state = {str(b.address.ip): b for b in service.backends}
    kept = [b for b in service.backends if str(b.address.ip) != victim]
    return [
        (dataclasses.replace(state[victim], admin=AdminState.DRAIN), *kept),
        (dataclasses.replace(state[victim], healthy=False), *kept),
        tuple(kept),
    ]
