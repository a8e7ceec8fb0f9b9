"""The real-kernel tier: runs inside the virtme-ng guest (Debian's kernel, with IPVS).

Topology per test: a client namespace and a backend namespace on either side of the
balancer's namespace, where `lb run` runs for real and IPVS lives. Backends answer with
"<their address> saw <peer address>": through IPVS NAT the peer is the client itself,
through the userspace proxy it is the balancer, so every answer says which path carried it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import Topology, topology
from tests.traffic import BACKEND_IPS, CLIENT_IPS


def pytest_configure(config: pytest.Config) -> None:
    subprocess.run(["modprobe", "-a", "ip_vs", "dummy"], check=False)
    if not Path("/proc/net/ip_vs").exists():
        raise pytest.UsageError(
            "the kernel tier needs a kernel with IPVS (run it through tests/test_kernel_tier.py)"
        )


@pytest.fixture
def topo() -> Iterator[Topology]:
    with topology(client_ips=CLIENT_IPS, backend_ips=BACKEND_IPS, vip_on=None) as t:
        yield t


def run_in(topo: Topology, *cmd: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", topo.lb, *cmd], check=True, capture_output=True, text=True
    ).stdout


def ipvsadm(topo: Topology) -> str:
    return run_in(topo, "ipvsadm", "-Ln")


def ipvs_save(topo: Topology) -> list[str]:
    return sorted(run_in(topo, "ipvsadm", "-Sn").splitlines())
