"""The nftables fast path on a kernel with flowtables (Debian's, in the VM): established
flows of lb's services past `offload.flow_threshold` packets go into the flowtable in
table `ip lb`; conntrack shows them offloaded, lb's counters and flow counts stay right,
drain, DOWN, removal and the UDP conntrack cleanup still act on them, the flowtable follows
the links that come and go, and removing lb's tables removes it (forwarding goes on
through conntrack)."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator

import pytest

from lb.changes import Changes
from lb.config import parse_config
from lb.model import Service
from offload.conntrack import Conntrack
from offload.netns import inside
from offload.nft_netlink import NftNetlink
from offload.nftables import NftDataplane
from tests.support.doubles import apply_diff
from tests.support.netns import Topology, socket_in
from tests.support.traffic import Backends, ask, client_conn, leaving

pytestmark = [pytest.mark.netns, pytest.mark.topology(vip_on="lo", ip_forward=True)]

THRESHOLD = 20
SERVICES = """
services:
  - name: web
    listen: 10.99.0.10:80
    retries: 0
    backends: [{address: "10.99.2.2:8080"}, {address: "10.99.2.3:8080"}]
  - name: dns
    protocol: udp
    listen: 10.99.0.10:53
    backends: [{address: "10.99.2.2:5353"}, {address: "10.99.2.3:5353"}]
"""


def services() -> tuple[Service, Service]:
    web, dns = parse_config(SERVICES).services
    return web, dns


def in_lb(topo: Topology, *cmd: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", topo.lb, *cmd], check=True, capture_output=True, text=True
    ).stdout


def flow_line(topo: Topology, proto: str, sport: int) -> str:
    """conntrack's line of the client's flow from `sport`."""
    for line in in_lb(topo, "conntrack", "-L", "-p", proto, "--sport", str(sport)).splitlines():
        if f"sport={sport} " in line:
            return line
    raise AssertionError(f"no {proto} flow from port {sport}")


def original_packets(line: str) -> int:
    return int(re.findall(r"packets=(\d+)", line)[0])


@pytest.fixture
async def dp(topo: Topology) -> AsyncIterator[NftDataplane]:
    d = NftDataplane(
        conntrack=Conntrack(),
        netlink=NftNetlink(topo.lb),
        flow_threshold=THRESHOLD,
        device="lb0",
    )
    with inside(topo.lb):
        await d.probe()
    assert d.fastpath, d.flowtable_unavailable
    yield d
    with inside(topo.lb):
        await d.remove_all()


async def apply(topo: Topology, dp: NftDataplane, desired: list[Service]) -> None:
    with inside(topo.lb):
        await apply_diff(dp, desired)


class Echo:
    """A TCP connection to the VIP from a known port, and its backend."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.sport = writer.get_extra_info("sockname")[1]
        self.backend = ""

    @classmethod
    async def open(cls, topo: Topology, source: str) -> Echo:
        e = cls(*await client_conn(topo, source))
        e.backend = (await asyncio.wait_for(e.reader.readline(), 10)).decode().split()[0]
        return e

    async def rounds(self, n: int) -> None:
        for i in range(n):
            self.writer.write(b"ping %d\n" % i)
            assert await asyncio.wait_for(self.reader.readline(), 10) == b"ping %d\n" % i


async def test_established_flows_past_the_threshold_are_offloaded_and_counted(
    topo: Topology, backends: Backends, dp: NftDataplane
) -> None:
    web, dns = services()
    await apply(topo, dp, [web, dns])
    listed = in_lb(topo, "nft", "list", "flowtable", "ip", "lb", "ft")
    assert "counter" in listed
    for dev in dp._ft_devices:
        assert dev in listed
    assert dp._ft_devices and "lo" not in dp._ft_devices
    assert dp.fastpath_note() == f"flowtable ft after {THRESHOLD} packets, on " + ", ".join(
        sorted(dp._ft_devices)
    )
    assert in_lb(topo, "sysctl", "-n", "net.netfilter.nf_conntrack_acct").strip() == "1"
    short = [await ask(topo, "10.99.1.2") for _ in range(4)]  # a few packets each
    assert all(a.endswith("saw 10.99.1.2") for a in short)
    long = await Echo.open(topo, "10.99.1.3")
    await long.rounds(THRESHOLD)  # past the threshold: into the flowtable
    await asyncio.sleep(0.5)
    line = flow_line(topo, "tcp", long.sport)
    assert "[OFFLOAD]" in line, line
    # short flows are not offloaded (the threshold, not just "established")
    listing = in_lb(topo, "conntrack", "-L", "-p", "tcp")
    assert sum("[OFFLOAD]" in x for x in listing.splitlines()) == 1, listing
    # the flowtable's counter flag: conntrack's packets go on counting offloaded packets
    before = original_packets(line)
    await long.rounds(30)
    after = original_packets(flow_line(topo, "tcp", long.sport))
    assert after >= before + 30, (before, after)
    # lb's counters: every connection counted once, on its backend; the offloaded one
    # is an active flow of its backend
    with inside(topo.lb):
        await dp.refresh()
    (snap,) = dp.observe(only=web.key)
    assert snap.totals.conns == 5
    active = {str(b.address.ip): b.active for b in snap.backends}
    assert active[long.backend] == 1, active
    long.writer.close()


async def test_drain_down_removal_and_udp_cleanup_act_on_offloaded_flows(
    topo: Topology, backends: Backends, dp: NftDataplane
) -> None:
    web, dns = services()
    await apply(topo, dp, [web, dns])
    long = await Echo.open(topo, "10.99.1.5")
    await long.rounds(THRESHOLD + 5)
    await asyncio.sleep(0.5)
    assert "[OFFLOAD]" in flow_line(topo, "tcp", long.sport)
    victim = long.backend

    async def picks(n: int = 6) -> set[str]:
        return {(await ask(topo, "10.99.1.6")).split()[0] for _ in range(n)}

    for remaining in leaving(web, victim):  # drained, DOWN, removed
        await apply(topo, dp, [web.with_backends(remaining), dns])
        assert victim not in await picks()
        await long.rounds(3)  # the established, offloaded flow goes on
    long.writer.close()

    # UDP: a flow offloaded, its backend DOWN: conntrack forgets it, and the flowtable lets
    # go of it (its garbage collector sees the entry dying), so that the client's next
    # datagrams are scheduled again, to a live backend
    loop = asyncio.get_running_loop()
    sock = socket_in(topo.client, socket.SOCK_DGRAM)
    sock.bind(("10.99.1.7", 0))
    sock.connect(("10.99.0.10", 53))  # (uvloop has no sock_sendto)
    sock.setblocking(False)
    sport = sock.getsockname()[1]

    async def send(i: int) -> str:
        await loop.sock_sendall(sock, b"q%d" % i)
        data = await asyncio.wait_for(loop.sock_recv(sock, 2048), 5)
        return data.decode().split()[0]

    try:
        first = {await send(i) for i in range(THRESHOLD + 5)}
        assert len(first) == 1, first  # one flow, one backend
        (target,) = first
        await asyncio.sleep(0.5)
        assert "[OFFLOAD]" in flow_line(topo, "udp", sport)
        dstate = {str(b.address.ip): b for b in dns.backends}
        down = dataclasses.replace(dstate[target], healthy=False)
        others = [b for b in dns.backends if str(b.address.ip) != target]
        await apply(topo, dp, [web, dns.with_backends((down, *others))])
        deadline = time.monotonic() + 10
        while (now := await send(0)) == target:  # the flowtable's gc: about a second
            assert time.monotonic() < deadline, "the offloaded UDP flow kept its dead backend"
            await asyncio.sleep(0.2)
        assert now != target
    finally:
        sock.close()


async def test_the_flowtable_follows_links_and_goes_with_lbs_tables(
    topo: Topology, backends: Backends, dp: NftDataplane
) -> None:
    web, dns = services()
    await apply(topo, dp, [web, dns])

    def listed() -> str:
        return in_lb(topo, "nft", "list", "flowtable", "ip", "lb", "ft")

    in_lb(topo, "ip", "link", "add", "ftnew0", "type", "dummy")
    with inside(topo.lb):
        await dp.refresh()
    assert "ftnew0" in listed() and "ftnew0" in dp.fastpath_note()
    in_lb(topo, "ip", "link", "del", "ftnew0")
    with inside(topo.lb):
        await dp.refresh()  # the kernel took it out by itself; nothing to write
    assert "ftnew0" not in listed() and "ftnew0" not in dp.fastpath_note()
    in_lb(topo, "ip", "link", "add", "ftnew0", "type", "dummy")  # back again
    with inside(topo.lb):
        await dp.refresh()
    assert "ftnew0" in listed()

    long = await Echo.open(topo, "10.99.1.8")
    await long.rounds(THRESHOLD + 5)
    await asyncio.sleep(0.5)
    assert "[OFFLOAD]" in flow_line(topo, "tcp", long.sport)
    with inside(topo.lb):
        await dp.remove_all()  # `lb cleanup` and shutdown: the flowtable goes with table lb
    assert "flowtable" not in in_lb(topo, "nft", "list", "ruleset")
    # the flowtable let go of the flow (which, with no nat chain left in the namespace,
    # is not translated any more: the same as without a flowtable)
    assert "[OFFLOAD]" not in flow_line(topo, "tcp", long.sport)
    long.writer.close()
    # and a rebuild puts it back (the fixture removes it at the end)
    with inside(topo.lb):
        await dp.apply([web, dns], Changes([web, dns], []))
    assert "flowtable ft" in in_lb(topo, "nft", "list", "ruleset")
