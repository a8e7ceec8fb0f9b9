"""Backends that fail and limits that bind, through `lb run` in userspace: a blackholed
backend (SYNs dropped, as a dead host or a firewall would) costs a client one connect
timeout and a retry, then health checks take it out; connection limits refuse what is
past them, count it, and serve again once connections close. Figures: clients served,
their slowest wait, seconds until the blackholed backend is DOWN, refusals counted."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import pytest

from tests.reliability.tier import figure
from tests.support import traffic
from tests.support.netns import Topology, sh

pytestmark = [pytest.mark.netns, pytest.mark.topology(vip_on="lo")]

GOOD, HOLE = "10.99.2.2", "10.99.2.5"


def blackhole(topo: Topology, ip: str) -> None:
    """Drop every packet to `ip` in the backend namespace: a connect to it times out."""
    nft = ("ip", "netns", "exec", topo.backends, "nft")
    sh(*nft, "add table inet hole")
    sh(*nft, "add chain inet hole in { type filter hook input priority 0; }")
    sh(*nft, f"add rule inet hole in ip daddr {ip} drop")


async def timed_ask(topo: Topology, source: str) -> tuple[str, float]:
    started = time.monotonic()
    answer = await traffic.ask(topo, source)
    return answer, time.monotonic() - started


async def test_a_blackholed_backend_costs_one_retry_then_health_checks_take_it_out(
    topo: Topology, backends: traffic.Backends, tmp_path: Path
) -> None:
    clients = 20
    blackhole(topo, HOLE)
    web = traffic.service_yaml(
        "web",
        80,
        [f"{{address: {HOLE}:8080}}", f"{{address: {GOOD}:8080}}"],
        "    scheduler: rr\n    connect_timeout: 2s\n    retries: 1\n",
    )
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(traffic.config_yaml([web], "userspace"))
    async with traffic.running_lb(topo, cfg) as lb:
        sources = topo.client_ips[:clients]
        first = await asyncio.gather(*(timed_ask(topo, s) for s in sources))
        served = sum(a.startswith(f"{GOOD} saw") for a, _ in first)
        retried = sum(t >= 1.8 for _, t in first)
        slowest = max(t for _, t in first)
        figure(
            f"blackholed backend, userspace: {served} of {clients} clients served, {retried} "
            f"after a 2 s connect timeout and a retry; the slowest waited {slowest:.1f}s"
        )
        assert served == clients and 0 < retried < clients and slowest < 10
        # health checks: the blackholed backend goes DOWN, and nobody waits for it any more
        n = len(lb.events)
        checked = web + "    health_check: {type: tcp, interval: 300ms, timeout: 200ms, fall: 2}\n"
        cfg.write_text(traffic.config_yaml([checked], "userspace"))
        lb.signal(signal.SIGHUP)
        reloaded = time.monotonic()
        await lb.wait_event("config.reloaded", after=n)
        down = await lb.wait_event("backend.health", after=n, timeout=20)
        assert f"backend {HOLE}:8080 " in down["msg"] and " is DOWN" in down["msg"], down
        took = down["_seen"] - reloaded
        second = await asyncio.gather(*(timed_ask(topo, s) for s in sources))
        slowest = max(t for _, t in second)
        figure(
            f"blackholed backend, userspace: DOWN {took:.1f}s after health checks began "
            f"(bound 10); then {sum(a.startswith(GOOD) for a, _ in second)} of {clients} "
            f"served, the slowest in {slowest:.2f}s"
        )
        assert took < 10 and all(a.startswith(f"{GOOD} saw") for a, _ in second)
        assert slowest < 1.5  # nobody waits for the connect timeout any more


async def refused(topo: Topology, source: str) -> bool:
    """Connect and read: True if lb resets (or closes) without a byte from a backend."""
    try:
        reader, writer = await traffic.client_conn(topo, source)
    except ConnectionResetError:  # the reset came before the connect was seen complete
        return True
    try:
        return await asyncio.wait_for(reader.read(100), 5) == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


async def test_connection_limits_refuse_count_and_let_go(
    topo: Topology, backends: traffic.Backends, tmp_path: Path
) -> None:
    """`max_connections: 50` on the service; a backend limited to 5 (`backends[].
    max_connections`) gets no more than 5 of them, the other takes the rest."""
    limit, small = 50, 5
    web = traffic.service_yaml(
        "web",
        80,
        [f"{{address: {GOOD}:8080, max_connections: {small}}}", "{address: 10.99.2.3:8080}"],
        f"    scheduler: rr\n    max_connections: {limit}\n",
    )
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(traffic.config_yaml([web], "userspace"))
    async with traffic.running_lb(topo, cfg) as lb:
        held = []
        for i in range(limit):
            reader, writer = await traffic.client_conn(topo, topo.client_ips[i % 30])
            held.append((await asyncio.wait_for(reader.readline(), 10), writer))
        on_small = sum(line.startswith(GOOD.encode()) for line, _ in held)
        extra = 10
        refusals = [await refused(topo, topo.client_ips[31]) for _ in range(extra)]
        info = await traffic.admin(topo, lb, "GET", "/api/v1/services/web")
        counted = info["connections"]["errors"].get("limit", 0)
        for _, writer in held:
            writer.close()
        released = time.monotonic()
        served = 0
        while served < extra:
            with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                if "saw" in await traffic.ask(topo, topo.client_ips[32]):
                    served += 1
                    continue
            assert time.monotonic() - released < 10, f"{served} served 10 s after the release"
            await asyncio.sleep(0.05)
        took = time.monotonic() - released
    figure(
        f"connection limits, userspace: {limit} held ({on_small} on the backend limited to "
        f"{small}); {sum(refusals)} of {extra} past the limit refused, {counted} counted as "
        f"`limit`; {extra} of {extra} served {took:.2f}s after the {limit} closed (bound 10)"
    )
    assert on_small == small and all(refusals) and counted == extra
