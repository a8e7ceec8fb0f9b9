"""lb itself at scale: the real `lb run` with N services x 10 backends, end to end.

bench/control.py times a dataplane's apply alone; this times what a user sees. For each
size and dataplane, in a network namespace of the bench's own:
- `start`: from `lb run` to /readyz answering 200 (config read, listeners bound, the
  kernel programmed);
- `rss`: lb's resident memory once started (MB);
- `idle_cpu`: lb's CPU time over 5 s (`--quick`: 2 s) with nothing happening (% of a core);
- `edit`: one backend's weight changed through the admin API (`POST
  /api/v1/services/NAME/backends/ADDRESS`), from the request to the answer, which lb
  sends once every dataplane has applied the change (medians of `runs` edits).
The admin API is reached through sockets made inside the namespace, so no `ip netns
exec` start-up is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

from bench.control import BACKEND_BASE, VIP_BASE, Netns, run
from bench.parse import proc_pid_stat
from bench.stats import Summary
from offload.netns import inside

ADMIN = "127.0.0.1:9191"
DATAPLANES = ("userspace", "nftables")
START_TIMEOUT = 900.0
VENV_LB = Path(sys.executable).with_name("lb")


def config(n: int, backends: int = 10) -> str:
    """N rr services (retries 0: expressible in the kernel), admin API on ADMIN."""
    lines = ["admin:", f"  listen: {ADMIN}", "services:"]
    for i in range(n):
        vip = ipaddress.ip_address(VIP_BASE + i)
        lines += [f"  - name: s{i}", f"    listen: {vip}:80", "    scheduler: rr"]
        lines += ["    retries: 0", "    backends:"]
        for j in range(backends):
            b = ipaddress.ip_address(BACKEND_BASE + i * backends + j)
            lines.append(f"      - address: {b}:8080")
    return "\n".join(lines) + "\n"


def edited_backend(n: int) -> tuple[str, str]:
    """The service and backend the edits change: the first backend of the middle one."""
    i = n // 2
    return f"s{i}", f"{ipaddress.ip_address(BACKEND_BASE + i * 10)}:8080"


def _cpu_seconds(pid: int) -> float:
    """lb's CPU time, with the `nft` and `conntrack` it ran (reaped children)."""
    return proc_pid_stat(Path(f"/proc/{pid}/stat").read_text())[1] / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def request(
    ns: Netns, method: str, path: str, body: bytes = b"", only: bytes | None = None
) -> tuple[int, bytes]:
    """One request to lb's admin API on the namespace's loopback: its status (0: no
    connection) and the rest of the answer (headers and body; with `only`, just its lines
    that start with `only`, read as they come: /metrics at 10,000 services is hundreds
    of MB). The socket is made inside the namespace (offload.netns), the rest is plain
    asyncio."""
    host, port = ADMIN.rsplit(":", 1)
    with inside(ns.name):
        sock = socket.socket()
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock)
    except OSError:
        sock.close()
        return 0, b""
    head = f"{method} {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    status = await reader.readline()
    if only is None:
        rest = await reader.read()
    else:
        kept, tail = [], b""
        wanted = re.compile(rb"^" + re.escape(only) + rb".*\n", re.MULTILINE)
        while chunk := await reader.read(1 << 20):
            whole, _, tail = (tail + chunk).rpartition(b"\n")
            kept += wanted.findall(whole + b"\n")
        rest = b"".join(kept)
    writer.close()
    return int(status.split()[1]), rest


async def _http(ns: Netns, method: str, path: str, body: bytes = b"") -> int:
    """One request to lb's admin API: its status."""
    return (await request(ns, method, path, body))[0]


async def _ready(ns: Netns, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"lb run exited {proc.returncode} before it was ready")
        if await _http(ns, "GET", "/readyz") == 200:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"lb run not ready after {START_TIMEOUT:g}s")


async def _edits(ns: Netns, service: str, backend: str, runs: int) -> list[float]:
    """`runs` weight edits (1, 0, 1, ...), each timed from request to answer."""
    path = f"/api/v1/services/{service}/backends/{backend}"
    out = []
    for i in range(runs):
        body = json.dumps({"weight": i % 2}).encode()
        start = time.perf_counter()
        status = await _http(ns, "POST", path, body)
        out.append(time.perf_counter() - start)
        if status != 200:
            raise RuntimeError(f"edit of {service} {backend} answered {status}")
        await asyncio.sleep(0.2)
    return out


@contextlib.asynccontextmanager
async def namespace(name: str, dataplane: str) -> AsyncIterator[Netns]:
    """A namespace for `lb run` on `dataplane`: loopback up and, for userspace, every
    VIP (VIP_BASE's /16) local, as its listeners need."""
    async with Netns(name) as ns:
        await run(ns.cmd("ip", "link", "set", "lo", "up"))
        if dataplane == "userspace":
            await run(ns.cmd("ip", "route", "add", "local", "10.100.0.0/16", "dev", "lo"))
        yield ns


@contextlib.asynccontextmanager
async def lb_running(
    ns: Netns, args: list[str], stderr: IO[bytes] | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, float]]:
    """`lb run ARGS` in the namespace, once ready: the process (`ip netns exec` execs lb:
    the same process) and the seconds from the command to /readyz answering 200; it is
    stopped on the way out. `stderr`: where its log goes (JSON lines)."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *ns.cmd(str(VENV_LB), "run", *args),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=stderr if stderr is not None else asyncio.subprocess.DEVNULL,
    )
    try:
        await _ready(ns, proc)
        yield proc, time.perf_counter() - started
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def idle(pid: int, quick: bool) -> tuple[float, float]:
    """Once started, after what start-up left to do (the first reads): lb's CPU over a
    window with nothing happening (% of a core), and its RSS (MB)."""
    settle, window = (1.0, 2.0) if quick else (3.0, 5.0)
    await asyncio.sleep(settle)
    cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(window)
    return 100 * (_cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0), _rss_mb(pid)


async def measure_one(n: int, dataplane: str, runs: int, quick: bool) -> dict[str, Summary]:
    """Start lb with N services on `dataplane`, measure, stop it."""
    async with namespace(f"lbbench-scale-{dataplane}", dataplane) as ns:
        with tempfile.TemporaryDirectory(prefix="lbbench-scale-") as tmp:
            cfg = Path(tmp) / "lb.yaml"
            cfg.write_text(config(n))
            args = ["-c", str(cfg), "--dataplane", dataplane]
            async with lb_running(ns, args) as (proc, start):
                idle_cpu, rss = await idle(proc.pid, quick)
                service, backend = edited_backend(n)
                edits = await _edits(ns, service, backend, runs)
    return {
        "start": Summary.of([start]),
        "rss_mb": Summary.of([rss]),
        "idle_cpu_percent": Summary.of([idle_cpu]),
        "edit": Summary.of(edits),
    }


Results = dict[str, dict[int, dict[str, Summary]]]


async def measure(
    sizes: list[int],
    runs: int,
    advance: Callable[[str], None] = lambda _: None,
    quick: bool = False,
) -> Results:
    results: Results = {dp: {} for dp in DATAPLANES}
    for n in sizes:
        for dp in DATAPLANES:
            results[dp][n] = await measure_one(n, dp, runs, quick)
            advance(f"lb run, {dp}, {n} services")
    return results
