"""Network namespaces for tests: the one topology (the `topo` fixture in tests/conftest.py
builds it), sockets opened inside a namespace, and commands run in the balancer's.

Sockets keep the namespace they were created in, so a test can make a listening socket
in a "backend" namespace and a client socket in a "client" namespace from one process
(setns on the calling thread, then back), while `lb run` runs in its own namespace.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from offload.netns import inside

#: The topology's addresses unless a test asks for others (@pytest.mark.topology(...)).
CLIENT_IPS = [f"10.99.1.{i}" for i in range(2, 40)]
BACKEND_IPS = ["10.99.2.2", "10.99.2.3", "10.99.2.4", "10.99.2.5"]
LB_SIDE = "10.99.2.1"  # the balancer's address towards the backends


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def socket_in(ns: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    with inside(ns):
        return socket.socket(socket.AF_INET, kind)


@dataclass
class Topology:
    """client ns --veth-- lb ns (VIP on its loopback) --veth-- backend ns."""

    tag: str
    client_ips: list[str] = field(default_factory=lambda: list(CLIENT_IPS))
    backend_ips: list[str] = field(default_factory=lambda: list(BACKEND_IPS))
    vip: str = "10.99.0.10"
    vip_on: str | None = None  # None: lb (or the test) puts the VIP somewhere; "lo": there
    ip_forward: bool = False  # net.ipv4.ip_forward=1 in the balancer's namespace

    @property
    def client(self) -> str:
        return f"lbt-c-{self.tag}"

    @property
    def lb(self) -> str:
        return f"lbt-lb-{self.tag}"

    @property
    def backends(self) -> str:
        return f"lbt-b-{self.tag}"

    def create(self) -> None:
        for ns in (self.client, self.lb, self.backends):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        t = self.tag
        sh(
            "ip",
            "link",
            "add",
            f"c{t}",
            "netns",
            self.client,
            "type",
            "veth",
            "peer",
            f"l{t}",
            "netns",
            self.lb,
        )
        sh(
            "ip",
            "link",
            "add",
            f"b{t}",
            "netns",
            self.backends,
            "type",
            "veth",
            "peer",
            f"m{t}",
            "netns",
            self.lb,
        )
        for ip in self.client_ips:
            sh("ip", "-n", self.client, "addr", "add", f"{ip}/24", "dev", f"c{t}")
        sh("ip", "-n", self.lb, "addr", "add", "10.99.1.1/24", "dev", f"l{t}")
        sh("ip", "-n", self.lb, "addr", "add", "10.99.2.1/24", "dev", f"m{t}")
        for ip in self.backend_ips:
            sh("ip", "-n", self.backends, "addr", "add", f"{ip}/24", "dev", f"b{t}")
        # The VIP as a /32 on the balancer's loopback (these kernels have no dummy driver).
        if self.vip_on is not None:
            sh("ip", "-n", self.lb, "addr", "add", f"{self.vip}/32", "dev", self.vip_on)
        for ns, dev in (
            (self.client, f"c{t}"),
            (self.lb, f"l{t}"),
            (self.lb, f"m{t}"),
            (self.backends, f"b{t}"),
        ):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.client, "route", "add", "default", "via", "10.99.1.1")
        sh("ip", "-n", self.backends, "route", "add", "default", "via", "10.99.2.1")
        if self.ip_forward:
            sh("ip", "netns", "exec", self.lb, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def destroy(self) -> None:
        for ns in (self.client, self.lb, self.backends):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def topology(**kwargs: Any) -> Iterator[Topology]:
    topo = Topology(tag=f"{os.getpid() % 100000}", **kwargs)
    topo.destroy()
    topo.create()
    try:
        yield topo
    finally:
        topo.destroy()


def run_in(topo: Topology, *cmd: str, check: bool = True) -> str:
    """Run a command in the balancer's namespace; its standard output."""
    return subprocess.run(
        ["ip", "netns", "exec", topo.lb, *cmd], check=check, capture_output=True, text=True
    ).stdout


def ipvsadm(topo: Topology) -> str:
    """The balancer namespace's IPVS table as `ipvsadm -Ln` lists it (the kernel tier)."""
    return run_in(topo, "ipvsadm", "-Ln")


def ipvs_save(topo: Topology) -> list[str]:
    """The balancer namespace's IPVS table as `ipvsadm -Sn` rules, sorted (the kernel tier)."""
    return sorted(run_in(topo, "ipvsadm", "-Sn").splitlines())
