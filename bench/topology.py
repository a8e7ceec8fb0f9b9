"""The data-plane bench's network: client ns -> balancer ns -> backend namespaces, over veth.

Each hop is a veth pair, so every byte crosses a real device and the balancer's stack, as
between machines (no loopback shortcut). Receive processing is steered with RPS: the
balancer's devices to its CPU, the client's and backends' to theirs, so the kernel work
of the balancer (forwarding, NAT, a proxy's TCP) lands on the balancer's CPU, where it is
counted, and not on whichever CPU happened to send the packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

PREFIX = "lbbench"
CLIENT_NS = f"{PREFIX}-client"
BALANCER_NS = f"{PREFIX}-lb"
VIP = "10.200.0.10"
CLIENT_IP = "10.200.1.2"
BALANCER_CLIENT_SIDE = "10.200.1.1"


def backend_ip(i: int) -> str:
    return f"10.201.{i + 1}.2"


def cpus() -> tuple[int, int]:
    """(CPU for the client and backends, CPU for the balancer): apart when there are two."""
    n = os.cpu_count() or 1
    return (0, 1) if n >= 2 else (0, 0)


async def sh(*cmd: str, stdin: str | None = None, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {err.decode(errors='replace').strip()}")
    return out.decode()


def _out(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout


def remove_bench_namespaces() -> None:
    """Delete every lbbench namespace, first killing what still runs in it (the bench's own
    processes: nothing else lives there). Synchronous, so that it also runs while asyncio
    is being torn down by a Ctrl-C."""
    for line in _out("ip", "netns", "list").splitlines():
        ns = line.split()[0] if line.strip() else ""
        if not ns.startswith(PREFIX):
            continue
        for pid in _out("ip", "netns", "pids", ns).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


LOCK = "/run/lbbench.lock"


@contextlib.contextmanager
def bench_lock() -> Iterator[None]:
    """One bench at a time on a machine: they share the namespace names (and would measure
    each other), and each removes what a killed one left. A second one waits its turn."""
    with open(LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            print(f"bench: waiting for the bench running as pid {holder}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class Topology:
    backends: int = 3
    client_cpu: int = field(default_factory=lambda: cpus()[0])
    balancer_cpu: int = field(default_factory=lambda: cpus()[1])

    @property
    def backend_ns(self) -> list[str]:
        return [f"{PREFIX}-b{i}" for i in range(self.backends)]

    @property
    def backend_ips(self) -> list[str]:
        return [backend_ip(i) for i in range(self.backends)]

    @property
    def all_ns(self) -> list[str]:
        return [CLIENT_NS, BALANCER_NS, *self.backend_ns]

    def on_client(self, *cmd: str) -> list[str]:
        return self.pinned(CLIENT_NS, self.client_cpu, *cmd)

    def on_balancer(self, *cmd: str) -> list[str]:
        return self.pinned(BALANCER_NS, self.balancer_cpu, *cmd)

    def on_backend(self, i: int, *cmd: str) -> list[str]:
        return self.pinned(self.backend_ns[i], self.client_cpu, *cmd)

    @staticmethod
    def pinned(ns: str, cpu: int, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns, "taskset", "-c", str(cpu), *cmd]

    async def _rps(self, ns: str, dev: str, cpu: int) -> None:
        path = f"/sys/class/net/{dev}/queues/rx-0/rps_cpus"
        # `ip netns exec` mounts the namespace's own /sys
        await sh("ip", "netns", "exec", ns, "sh", "-c", f"echo {1 << cpu:x} > {path}")

    async def create(self) -> None:
        for ns in self.all_ns:
            await sh("ip", "netns", "add", ns)
            await sh("ip", "-n", ns, "link", "set", "lo", "up")
        links = [(CLIENT_NS, "lbbench-c", "lbbench-lc", BALANCER_CLIENT_SIDE, CLIENT_IP)]
        links += [
            (ns, f"lbbench-b{i}", f"lbbench-lb{i}", f"10.201.{i + 1}.1", backend_ip(i))
            for i, ns in enumerate(self.backend_ns)
        ]
        for ns, dev, peer, gateway, ip in links:
            await sh(
                "ip", "link", "add", dev, "netns", ns, "type", "veth",
                "peer", peer, "netns", BALANCER_NS,
            )  # fmt: skip
            await sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            await sh("ip", "-n", BALANCER_NS, "addr", "add", f"{gateway}/24", "dev", peer)
            await sh("ip", "-n", ns, "link", "set", dev, "up")
            await sh("ip", "-n", BALANCER_NS, "link", "set", peer, "up")
            await sh("ip", "-n", ns, "route", "add", "default", "via", gateway)
            await self._rps(ns, dev, self.client_cpu)
            await self._rps(BALANCER_NS, peer, self.balancer_cpu)
        await sh("ip", "netns", "exec", BALANCER_NS, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for ns in self.all_ns:  # many short connections: room for ports and backlogs
            await sh(
                "ip", "netns", "exec", ns, "sysctl", "-qw",
                "net.ipv4.ip_local_port_range=1024 65000", "net.core.somaxconn=8192",
                "net.ipv4.tcp_max_syn_backlog=8192", "net.ipv4.tcp_tw_reuse=1",
            )  # fmt: skip

    async def vip_local(self, on: bool) -> None:
        """The VIP as a local address of the balancer (proxies bind it); kernel NAT needs
        none (lb nftables puts it on its own device)."""
        verb = "add" if on else "del"
        await sh(
            "ip", "-n", BALANCER_NS, "addr", verb, f"{VIP}/32", "dev", "lo", check=on,
        )  # fmt: skip

    async def reset_kernel_state(self) -> None:
        """Between peers: no rules or conntrack entries left by the previous one."""
        await sh("ip", "netns", "exec", BALANCER_NS, "nft", "flush", "ruleset", check=False)
        await self.flush_conntrack()

    async def flush_conntrack(self) -> None:
        await sh("ip", "netns", "exec", BALANCER_NS, "conntrack", "-F", check=False)


@contextlib.asynccontextmanager
async def topology(backends: int = 3) -> AsyncIterator[Topology]:
    """The namespaces, removed on the way out whatever happens (error, Ctrl-C), and any
    left by an earlier bench that was killed, removed before."""
    topo = Topology(backends)
    remove_bench_namespaces()
    try:
        await topo.create()
        yield topo
    finally:
        remove_bench_namespaces()
