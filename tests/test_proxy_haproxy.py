"""The PROXY protocol against a real peer: HAProxy on both sides of lb, on loopback.

    client -> HAProxy `front` --send-proxy(-v2)--> lb (accept_proxy_protocol,
    proxy_protocol: v1|v2) --> HAProxy `behind` (bind ... accept-proxy) --send-proxy-->
    a backend here that reads the header

The backend must see the client's own address and port, and HAProxy's `front` as the
destination: the header went through HAProxy into lb, and out of lb into HAProxy, intact.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.net import TcpBackend, balancer, eventually, free_port
from tests.support.root import CI


def haproxy() -> str:
    path = shutil.which("haproxy")
    if path is None:
        if CI:
            pytest.fail("haproxy is missing (scripts/setup installs it), and CI=true")
        pytest.skip("haproxy is not installed (scripts/setup installs it)")
    return path


class HAProxy:
    """HAProxy processes a test starts, each from a config file; ended by their own pid."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, config: str) -> None:
        binary = haproxy()
        cfg = self.tmp_path / f"haproxy{len(self.procs)}.cfg"
        cfg.write_text(config)
        check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr.decode()
        with open(cfg.with_suffix(".log"), "wb") as log:
            self.procs.append(
                subprocess.Popen([binary, "-f", str(cfg), "-db"], stdout=log, stderr=log)
            )

    def log(self) -> str:
        return "".join(p.read_text() for p in sorted(self.tmp_path.glob("haproxy*.log")))

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def run_haproxy(tmp_path: Path) -> Iterator[HAProxy]:
    haproxy()
    h = HAProxy(tmp_path)
    try:
        yield h
    finally:
        h.stop()


async def connect_when_listening(
    port: int, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        except ConnectionRefusedError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.parametrize(("haproxy_sends", "lb_sends"), [("v1", "v2"), ("v2", "v1")])
async def test_haproxy_in_front_of_and_behind_lb(
    run_haproxy: HAProxy, haproxy_sends: str, lb_sends: str
) -> None:
    front, lb_port, behind = free_port(), free_port(), free_port()
    got: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.readuntil(b"\r\n"))  # HAProxy's send-proxy: version 1
        writer.write(b"app\n")
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    backend = await TcpBackend("app", handler=app).start()
    send = "send-proxy" if haproxy_sends == "v1" else "send-proxy-v2"
    run_haproxy.start(
        "global\n  maxconn 200\n"
        "defaults\n  mode tcp\n  timeout connect 10s\n  timeout client 60s\n"
        "  timeout server 60s\n"
        f"frontend front\n  bind 127.0.0.1:{front}\n  default_backend to_lb\n"
        f"backend to_lb\n  server lb 127.0.0.1:{lb_port} {send}\n"
        f"frontend behind\n  bind 127.0.0.1:{behind} accept-proxy\n  default_backend to_app\n"
        f"backend to_app\n  server app {backend.address} send-proxy\n"
    )
    text = (
        f"services:\n  - name: web\n    listen: 127.0.0.1:{lb_port}\n"
        f"    accept_proxy_protocol: true\n    proxy_protocol: {lb_sends}\n"
        f"    backends: [{{address: '127.0.0.1:{behind}'}}]\n"
    )
    async with balancer(text) as lb:
        reader, writer = await connect_when_listening(front, "127.0.0.2")
        sport = writer.get_extra_info("sockname")[1]
        writer.write(b"through both")
        assert await asyncio.wait_for(reader.readline(), 30) == b"app\n"
        assert await asyncio.wait_for(reader.readexactly(12), 30) == b"through both"
        writer.close()
        want = f"PROXY TCP4 127.0.0.2 127.0.0.1 {sport} {front}\r\n".encode()
        assert got == [want], run_haproxy.log()
        rt = lb.runtime("web")
        await eventually(lambda: rt.open == 0, 30)
        assert sum(rt.counters.errors.values()) == 0
    await backend.stop()
