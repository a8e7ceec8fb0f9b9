"""The real-kernel tier: runs inside the virtme-ng guest (Debian's kernel, with IPVS).

Topology per test (the `topo` fixture of tests/conftest.py, in its default shape: no VIP
placed): a client namespace and a backend namespace on either side of the balancer's
namespace, where `lb run` runs for real and IPVS lives. Backends answer with
"<their address> saw <peer address>": through IPVS NAT the peer is the client itself,
through the userspace proxy it is the balancer, so every answer says which path carried it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    subprocess.run(["modprobe", "-a", "ip_vs", "dummy"], check=False)
    if not Path("/proc/net/ip_vs").exists():
        raise pytest.UsageError(
            "the kernel tier needs a kernel with IPVS (run it through tests/test_kernel_tier.py)"
        )
