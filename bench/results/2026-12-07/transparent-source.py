"""The cost of `source: transparent` against `source: proxy` in lb's userspace dataplane:
new connections per second through one lb with both services, side by side.

Namespaces of its own (`lbtsrc-*`: client | balancer | one backend over veth, the
backend routing the client's network back through the balancer; the client and the
backend pinned on one CPU, lb on the other, as bench/topology.py does), an nginx backend
answering `ok` (bench/peers.py), `lb run --dataplane userspace` with two services on the
VIP to that backend: `plain` (port 80, lb's address) and `transparent` (port 81, the client's).
Each round runs CONNECTIONS connect / HTTP request (`Connection: close`) / read to the end /
close from the client's namespace, IN_FLIGHT at a time (a bare epoll loop: see
bench/loadgen.py), for each service in turn (the order alternates); the figure is the
median of ROUNDS rounds. Every connection is checked: the answer must be nginx's.

`micro`: the connect paths alone, in a namespace of their own on its loopback (no policy
routing, no relaying): uvloop's `create_connection(host, port)` (the plain relay's), the
transparent socket connected by lb.proxy.transparent.connect then handed to
`create_connection(sock=...)` (the transparent relay's), and the same with
`loop.sock_connect` instead (its first version), MICRO connects each, microseconds per
connect, three times in turn.

Run as root from the repository root (it waits for the bench lock, so that no other
bench shares the CPUs, and removes only its own namespaces):
    .venv/bin/python bench/results/2026-12-07/transparent-source.py [OUT.md]
    .venv/bin/python bench/results/2026-12-07/transparent-source.py micro
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from bench.peers import Proc, nginx_backend_conf
from bench.topology import bench_lock, cpus, sh

CONNECTIONS = 2000
IN_FLIGHT = 16
ROUNDS = 3
PORTS = {"plain": 80, "transparent": 81}
BACKEND_PORT = 8080
ADMIN = "127.0.0.1:9090"
CLIENT, BALANCER, BACKEND = "lbtsrc-c", "lbtsrc-lb", "lbtsrc-b"
VIP, CLIENT_IP, BACKEND_IP = "10.210.0.10", "10.210.1.2", "10.210.2.2"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


MICRO = 4000
MICRO_NS = "lbtsrc-m"


async def micro() -> None:
    """In MICRO_NS: the three connect paths, microseconds per connect."""
    from lb.proxy import transparent

    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 9999, backlog=4096)
    to = ("127.0.0.1", 9999)

    async def plain() -> None:
        tr, _ = await loop.create_connection(asyncio.Protocol, *to)
        tr.abort()

    async def clear() -> None:
        sock = transparent.connect_socket(socket.AF_INET, "127.0.0.2")
        await transparent.connect(loop, sock, to)
        tr, _ = await loop.create_connection(asyncio.Protocol, sock=sock)
        tr.abort()

    async def via_sock_connect() -> None:
        sock = transparent.connect_socket(socket.AF_INET, "127.0.0.2")
        await loop.sock_connect(sock, to)
        tr, _ = await loop.create_connection(asyncio.Protocol, sock=sock)
        tr.abort()

    paths = {
        "create_connection (plain)": plain,
        "transparent (connect)": clear,
        "transparent (loop.sock_connect)": via_sock_connect,
    }
    for r in range(3):
        for name, path in paths.items():
            begin = time.perf_counter()
            for _ in range(MICRO):
                await path()
            us = (time.perf_counter() - begin) / MICRO * 1e6
            print(f"round {r + 1} {name}: {us:.1f} us per connect", flush=True)
    server.close()


def run_micro() -> None:
    _, far = cpus()
    subprocess.run(["ip", "netns", "del", MICRO_NS], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", MICRO_NS], check=True)
    try:
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"],
        ):
            subprocess.run(["ip", "netns", "exec", MICRO_NS, *cmd], check=True)
        subprocess.run([*pinned(MICRO_NS, far, sys.executable, __file__, "micro-run")], check=True)
    finally:
        subprocess.run(["ip", "netns", "del", MICRO_NS], capture_output=True, check=False)


def client(host: str, port: int, total: int, in_flight: int) -> dict[str, float]:
    """In the client's namespace: `total` connections, `in_flight` at a time; the seconds
    it took and how many failed (no complete `200` answer)."""
    ep = select.epoll()
    socks: dict[int, tuple[socket.socket, bytearray]] = {}
    started = done = failed = 0

    def start() -> None:
        nonlocal started
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, "connect")
        socks[s.fileno()] = (s, bytearray())
        ep.register(s.fileno(), select.EPOLLOUT)
        started += 1

    def finish(fd: int, ok: bool) -> None:
        nonlocal done, failed
        s, _ = socks.pop(fd)
        ep.unregister(fd)
        s.close()
        done += 1
        failed += not ok

    begin = time.perf_counter()
    while started < min(in_flight, total):
        start()
    while done < total:
        for fd, events in ep.poll(5.0):
            s, got = socks[fd]
            if events & select.EPOLLOUT:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    finish(fd, False)
                else:
                    s.send(REQUEST)
                    ep.modify(fd, select.EPOLLIN)
                    continue
            else:
                data = s.recv(4096)
                if data:
                    got += data
                    continue
                finish(fd, got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok\n"))
            if started < total:
                start()
    return {"seconds": time.perf_counter() - begin, "failed": failed}


def lb_yaml(backend: str) -> str:
    out = f"dataplane: userspace\nshutdown_grace: 1s\nadmin: {{listen: {ADMIN}}}\nservices:\n"
    for name, port in PORTS.items():
        out += (
            f"  - name: {name}\n    listen: {VIP}:{port}\n    scheduler: rr\n"
            f"    source: {'transparent' if name == 'transparent' else 'proxy'}\n"
            f"    backends: [{{address: '{backend}:{BACKEND_PORT}'}}]\n"
        )
    return out


def remove_namespaces() -> None:
    for ns in (CLIENT, BALANCER, BACKEND):
        pids = subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
        )
        for pid in pids.stdout.split():  # this script's own, from a run that was killed
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@contextlib.asynccontextmanager
async def namespaces() -> AsyncIterator[None]:
    remove_namespaces()  # a killed run's
    try:
        for ns in (CLIENT, BALANCER, BACKEND):
            await sh("ip", "netns", "add", ns)
            await sh("ip", "-n", ns, "link", "set", "lo", "up")
        for ns, dev, peer, gateway, ip in (
            (CLIENT, "tsrc-c", "tsrc-lc", "10.210.1.1", CLIENT_IP),
            (BACKEND, "tsrc-b", "tsrc-lb", "10.210.2.1", BACKEND_IP),
        ):
            await sh(
                "ip", "link", "add", dev, "netns", ns, "type", "veth",
                "peer", peer, "netns", BALANCER,
            )  # fmt: skip
            await sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            await sh("ip", "-n", BALANCER, "addr", "add", f"{gateway}/24", "dev", peer)
            await sh("ip", "-n", ns, "link", "set", dev, "up")
            await sh("ip", "-n", BALANCER, "link", "set", peer, "up")
            await sh("ip", "-n", ns, "route", "add", "default", "via", gateway)
        await sh("ip", "-n", BALANCER, "addr", "add", f"{VIP}/32", "dev", "lo")
        for ns in (CLIENT, BALANCER, BACKEND):  # many short connections: room for ports
            await sh(
                "ip", "netns", "exec", ns, "sysctl", "-qw",
                "net.ipv4.ip_local_port_range=1024 65000", "net.core.somaxconn=8192",
                "net.ipv4.tcp_tw_reuse=1",
            )  # fmt: skip
        yield
    finally:
        remove_namespaces()


async def reachable(host: str, port: int) -> None:
    """From the client's namespace, within 30 s."""
    check = f"import socket; socket.create_connection(({host!r}, {port}), 1).close()"
    for _ in range(150):
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", CLIENT, sys.executable, "-c", check,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        if await proc.wait() == 0:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{host}:{port} not reachable from the client")


def pinned(ns: str, cpu: int, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, "taskset", "-c", str(cpu), *cmd]


async def measure() -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {name: [] for name in PORTS}
    near, far = cpus()  # the client and the backend; lb
    with tempfile.TemporaryDirectory() as name:
        work = Path(name)
        async with namespaces():
            (work / "tmp").mkdir()
            conf = work / "nginx.conf"
            conf.write_text(nginx_backend_conf(work, BACKEND_IP, BACKEND_PORT))
            nginx = ["nginx", "-p", str(work), "-c", str(conf), "-e", "stderr"]
            procs = [await Proc.start("nginx", pinned(BACKEND, near, *nginx), work / "nginx.log")]
            (work / "lb.yaml").write_text(lb_yaml(BACKEND_IP))
            lb = str(Path(sys.executable).with_name("lb"))
            cmd = pinned(BALANCER, far, lb, "run", "-c", str(work / "lb.yaml"))
            procs.append(await Proc.start("lb", [*cmd, "--log-format", "json"], work / "lb.log"))
            try:
                await reachable(BACKEND_IP, BACKEND_PORT)
                for port in PORTS.values():
                    await reachable(VIP, port)
                for r in range(ROUNDS):
                    order = list(PORTS) if r % 2 == 0 else list(reversed(PORTS))
                    for svc in order:
                        out = await sh(
                            *pinned(
                                CLIENT, near, sys.executable, __file__, "client",
                                VIP, str(PORTS[svc]), str(CONNECTIONS), str(IN_FLIGHT),
                            )
                        )  # fmt: skip
                        res = json.loads(out)
                        if res["failed"]:
                            raise RuntimeError(f"{svc}: {res['failed']} connections failed")
                        rates[svc].append(CONNECTIONS / res["seconds"])
                        print(f"round {r + 1} {svc}: {rates[svc][-1]:,.0f}/s", flush=True)
            finally:
                for p in procs:
                    await p.stop()
    return rates


def report(rates: dict[str, list[float]]) -> str:
    plain = statistics.median(rates["plain"])
    clear = statistics.median(rates["transparent"])
    rows = "".join(
        f"| `{name}` | {statistics.median(r):,.0f} | {', '.join(f'{x:,.0f}' for x in r)} |\n"
        for name, r in rates.items()
    )
    return (
        f"| source | new connections/s (median of {ROUNDS}) | rounds |\n"
        "| --- | ---: | --- |\n" + rows + f"\ntransparent / plain: {clear / plain:.2f}\n"
    )


def main(argv: list[str]) -> None:
    if argv[:1] == ["client"]:
        host, port, total, in_flight = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        print(json.dumps(client(host, port, total, in_flight)))
        return
    if argv[:1] == ["micro-run"]:
        import uvloop

        uvloop.run(micro())
        return
    if argv[:1] == ["micro"]:
        with bench_lock():
            run_micro()
        return
    with bench_lock():
        rates = asyncio.run(measure())
    table = report(rates)
    print(table)
    if argv:
        Path(argv[0]).write_text(table)


if __name__ == "__main__":
    main(sys.argv[1:])
