"""The nftables dataplane on the real kernel of this machine: clients, balancer and
backends in their own network namespaces, NAT by lb's tables `ip lb*` (needs root)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import subprocess
from collections.abc import Callable

import pytest

from lb.changes import Changes
from lb.config import parse_config
from lb.model import AdminState, Service
from lb.persist import Affinity
from offload.netns import inside
from offload.nft_netlink import NftNetlink
from offload.nft_rules import cycle
from offload.nftables import NftDataplane
from tests.support.doubles import apply_diff
from tests.support.netns import CLIENT_IPS, LB_SIDE, Topology
from tests.support.traffic import (
    Backends,
    ask,
    ask_udp,
    client_conn,
    connects,
    leaving,
)

# the VIP on the balancer's loopback, and the balancer forwards (no lb process sets it here)
pytestmark = [pytest.mark.netns, pytest.mark.topology(vip_on="lo", ip_forward=True)]


@pytest.fixture(params=["netlink", "nft"])
def make_dp(request: pytest.FixtureRequest, topo: Topology) -> Callable[[], NftDataplane]:
    """Changes after the first apply go over netlink (what lb does) or through `nft -f`
    (the fallback): both must carry the same traffic."""

    def make() -> NftDataplane:
        return NftDataplane(netlink=NftNetlink(topo.lb) if request.param == "netlink" else None)

    return make


def config(text: str) -> list[Service]:
    return list(parse_config(text).services)


WEB = """
  - name: web
    listen: 10.99.0.10:80
    scheduler: wrr
    retries: 0
    backends:
      - {address: 10.99.2.2:8080, weight: 3}
      - {address: 10.99.2.3:8080, weight: 2}
      - {address: 10.99.2.4:8080, weight: 1}
"""
DNS = """
  - name: dns
    protocol: udp
    listen: 10.99.0.10:53
    scheduler: rr
    backends: [{address: 10.99.2.5:5353}]
"""


def nft_in(topo: Topology, *args: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", topo.lb, "nft", *args], check=True, capture_output=True, text=True
    ).stdout


async def apply(topo: Topology, dp: NftDataplane, services: list[Service]) -> None:
    with inside(topo.lb):  # nft runs in the balancer's namespace
        await apply_diff(dp, services)


async def test_forwarding_with_port_mapping_and_the_kernels_wrr_cycle(
    topo: Topology, backends: Backends, make_dp: Callable[[], NftDataplane]
) -> None:
    web, dns = config("services:" + WEB + DNS)
    dp = make_dp()
    await apply(topo, dp, [web, dns])
    answers = [await ask(topo, "10.99.1.2") for _ in range(12)]
    # NAT, not a proxy: the backend sees the client; the picks follow IPVS's wrr cycle
    assert all(a.endswith("saw 10.99.1.2") for a in answers), answers
    expected = [str(e.ip) for e in cycle(web)] * 2
    assert [a.split()[0] for a in answers] == expected
    assert expected[:6] == [
        "10.99.2.4",
        "10.99.2.3",
        "10.99.2.2",
        "10.99.2.2",
        "10.99.2.3",
        "10.99.2.2",
    ]
    data, source = await ask_udp(topo, "10.99.1.3", b"query")
    assert data == b"10.99.2.5 saw 10.99.1.3:query" and source == ("10.99.0.10", 53)
    with inside(topo.lb):
        await dp.refresh()
    (snap, _) = sorted(dp.observe(), key=lambda s: s.service.name, reverse=True)
    assert snap.dataplane == "nftables" and snap.totals.conns == 12
    assert {str(b.address): b.totals.conns for b in snap.backends} == {
        "10.99.2.2:8080": 6,
        "10.99.2.3:8080": 4,
        "10.99.2.4:8080": 2,
    }


async def test_an_idle_refresh_looks_up_one_counter_instead_of_dumping_them_all(
    topo: Topology, backends: Backends
) -> None:
    """Each refresh looks up the `total` counter (nft_rules.TOTAL); the per-backend
    counters are dumped only when it moved: an idle lb at 10,000 services does not dump
    100,000 counters every refresh. A connection moves it, a rebuilt table reads again."""
    web, dns = config("services:" + WEB + DNS)
    dp = NftDataplane(netlink=NftNetlink(topo.lb))
    await apply(topo, dp, [web, dns])
    with inside(topo.lb):
        await dp.refresh()
    dumps = dp.counter_dumps
    for _ in range(3):
        with inside(topo.lb):
            await dp.refresh()
    assert dp.counter_dumps == dumps  # nothing moved: no dump
    await ask(topo, "10.99.1.2")
    await ask_udp(topo, "10.99.1.3", b"query")
    with inside(topo.lb):
        await dp.refresh()
        await dp.refresh()
    assert dp.counter_dumps == dumps + 1  # once, when the total moved
    assert sorted(s.totals.conns for s in dp.observe()) == [1, 1]
    assert "counter total" in nft_in(topo, "list", "table", "ip", "lb")
    await ask(topo, "10.99.1.2")
    with inside(topo.lb):
        await dp.refresh()
    assert dp.counter_dumps == dumps + 2
    assert sorted(s.totals.conns for s in dp.observe()) == [1, 2]


async def test_persistence_keeps_a_client_subnet_on_one_backend(
    topo: Topology, backends: Backends, make_dp: Callable[[], NftDataplane]
) -> None:
    (web,) = config(
        "services:"
        + WEB.replace("retries: 0", "retries: 0\n    persistence: {timeout: 60, netmask: /24}")
    )
    dp = make_dp()
    await apply(topo, dp, [web])
    seen = {(await ask(topo, ip)).split()[0] for ip in CLIENT_IPS[:6] for _ in range(3)}
    assert len(seen) == 1
    # drained: the affinity no longer applies, the clients go elsewhere
    (first,) = seen
    drained = web.with_backends(
        tuple(
            dataclasses.replace(b, admin=AdminState.DRAIN) if str(b.address.ip) == first else b
            for b in web.backends
        )
    )
    await apply(topo, dp, [drained])
    again = {(await ask(topo, ip)).split()[0] for ip in CLIENT_IPS[:6]}
    assert first not in again and len(again) == 1


@pytest.mark.parametrize("when", ["built", "added"])
async def test_affinity_is_seeded_before_the_kernel_takes_the_service_and_read_back(
    topo: Topology, backends: Backends, make_dp: Callable[[], NftDataplane], when: str
) -> None:
    """A promote: the clients userspace kept on a backend stay on it in the kernel, from
    their first connection (seeded in the transaction that makes the service), and what
    the kernel holds can be read back for a demote."""
    (web,) = config(
        "services:"
        + WEB.replace("retries: 0", "retries: 0\n    persistence: {timeout: 60, netmask: /24}")
    )
    target = web.backends[2].address  # weight 1: not the cycle's first pick
    net = ipaddress.ip_address("10.99.1.0")
    seeds = {web.key: [Affinity(net, target, 30.0)]}
    dp = make_dp()
    with inside(topo.lb):
        if when == "built":  # the first apply builds the tables
            await dp.apply([web], Changes([web]), seeds)
        else:  # the tables are there: the service comes with the change
            await dp.apply([], Changes())
            await dp.apply([web], Changes([web]), seeds)
    seen = {(await ask(topo, ip)).split()[0] for ip in CLIENT_IPS[:6] for _ in range(3)}
    assert seen == {str(target.ip)}
    with inside(topo.lb):
        (back,) = await dp.export_affinity(web.key)
    assert (back.client, back.backend) == (net, target)
    assert 50 <= back.remaining <= 60  # renewed by those connections: the service's timeout
    with inside(topo.lb):  # lb list --persistent-conn: the templates per backend
        await dp.refresh()
    (snap,) = dp.observe(web.key)
    assert {str(b.address): b.persistent for b in snap.backends} == {
        str(b.address): int(b.address == target) for b in web.backends
    }


async def test_drain_down_and_removal_spare_established_connections(
    topo: Topology, backends: Backends, make_dp: Callable[[], NftDataplane]
) -> None:
    (web,) = config("services:" + WEB)
    dp = make_dp()
    await apply(topo, dp, [web])
    reader, writer = await client_conn(topo, "10.99.1.5")
    victim = (await asyncio.wait_for(reader.readline(), 5)).decode().split()[0]

    async def still_echoes() -> None:
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"

    async def picks(n: int = 9) -> set[str]:
        return {(await ask(topo, "10.99.1.6")).split()[0] for _ in range(n)}

    for remaining in leaving(web, victim):  # drained, DOWN, removed
        await apply(topo, dp, [web.with_backends(remaining)])
        assert victim not in await picks()
        await still_echoes()
    writer.close()
    # every backend taken out: the service leaves the map, nothing is DNATed any more
    await apply(topo, dp, [web.with_backends(())])
    assert "10.99.0.10" not in nft_in(topo, "list", "ruleset")


async def test_foreign_tables_untouched_and_a_stale_table_replaced(
    topo: Topology, backends: Backends, make_dp: Callable[[], NftDataplane]
) -> None:
    foreign = "table inet keepme {\n  chain c {\n    type filter hook input priority 10; policy accept;\n    tcp dport 9 counter\n  }\n}\n"
    stale = "table ip lb {\n  chain junk {\n    counter\n  }\n}\ntable ip lb_3 {\n  chain junk {\n  }\n}\n"
    for script in (foreign, stale):
        subprocess.run(
            ["ip", "netns", "exec", topo.lb, "nft", "-f", "-"], input=script.encode(), check=True
        )
    before = nft_in(topo, "list", "table", "inet", "keepme")
    (web,) = config("services:" + WEB)
    dp = make_dp()  # a new process after a crash: adopts by replacing, atomically
    await apply(topo, dp, [web])
    assert "junk" not in nft_in(topo, "list", "ruleset")
    assert (await ask(topo, "10.99.1.2")).endswith("saw 10.99.1.2")
    with inside(topo.lb):
        await dp.remove_all()
        await dp.remove_all()  # nothing left: not an error
    assert "table ip lb" not in nft_in(topo, "list", "tables")
    assert nft_in(topo, "list", "table", "inet", "keepme") == before
    # without the kernel path, nothing answers on the VIP in this test: refused
    with pytest.raises(ConnectionRefusedError):
        await ask(topo, "10.99.1.2")
    assert LB_SIDE  # (the userspace path is not part of these tests)


async def test_allowed_sources_drop_other_clients_before_dnat(
    topo: Topology, backends: Backends, make_dp: Callable[[], NftDataplane]
) -> None:
    """`allowed_sources` in the kernel: a client outside them gets no answer (dropped
    before DNAT, as kube-proxy drops outside loadBalancerSourceRanges), one inside is
    NATed to a backend; an edit applied as a change moves the line for new connections
    (an established one goes on: the filter sees first packets only); the service's
    removal takes its filter."""
    (web,) = config(
        "services:" + WEB.replace("retries: 0", "retries: 0\n    allowed_sources: [10.99.1.2/31]")
    )
    (dns,) = config(
        "services:"
        + DNS.replace("scheduler: rr", "scheduler: rr\n    allowed_sources: [10.99.1.3]")
    )
    dp = make_dp()
    await apply(topo, dp, [web, dns])
    assert (await ask(topo, "10.99.1.2")).endswith("saw 10.99.1.2")  # NAT: the kernel's
    assert (await ask(topo, "10.99.1.3")).endswith("saw 10.99.1.3")
    assert not await connects(topo, "10.99.1.5")
    data, _ = await ask_udp(topo, "10.99.1.3", b"q")
    assert data == b"10.99.2.5 saw 10.99.1.3:q"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ask_udp(topo, "10.99.1.2", b"q"), 1)
    # a client on the balancer itself (its source is the VIP): outside, dropped too
    assert not await connects(topo, topo.vip, ns=topo.lb)
    reader, writer = await client_conn(topo, "10.99.1.2")
    await reader.readline()
    narrower = dataclasses.replace(web, allowed_sources=(ipaddress.ip_network("10.99.1.4/30"),))
    await apply(topo, dp, [narrower, dns])
    assert (await ask(topo, "10.99.1.5")).endswith("saw 10.99.1.5")
    assert not await connects(topo, "10.99.1.2")
    writer.write(b"still there")  # established before the edit: goes on
    assert await asyncio.wait_for(reader.readexactly(11), 5) == b"still there"
    writer.close()
    opened = dataclasses.replace(narrower, allowed_sources=())
    await apply(topo, dp, [opened, dns])
    assert (await ask(topo, "10.99.1.2")).endswith("saw 10.99.1.2")
    assert await connects(topo, topo.vip, ns=topo.lb)
    await apply(topo, dp, [opened])
    ruleset = nft_in(topo, "list", "ruleset")
    assert "fw_" not in ruleset and "src_" not in ruleset
    with inside(topo.lb):
        await dp.remove_all()


MIXED = """
  - name: sticky
    listen: 10.99.0.10:80
    scheduler: wrr
    retries: 0
    persistence: {timeout: 60, netmask: 255.255.255.0}
    backends:
      - {address: 10.99.2.2:8080, weight: 3}
      - {address: 10.99.2.3:8080, weight: 2}
  - name: hashed
    listen: 10.99.0.10:81
    scheduler: sh
    scheduler_flags: [sh-port]
    retries: 0
    allowed_sources: [10.99.1.0/24, 10.99.1.7, 0.0.0.0/8, 255.255.255.0/24]
    backends:
      - {address: 10.99.2.2:8080, weight: 2}
      - {address: 10.99.2.3:8080}
  - name: hairpin
    protocol: udp
    listen: 10.99.0.10:53
    scheduler: rr
    allowed_sources: ['2001:db8::/32']
    backends: [{address: 10.99.2.5:5353}, {address: 10.99.2.4:53}]
"""


def edits(services: list[Service]) -> list[list[Service]]:
    """A sequence of states touching every kind of object: add, drain, new timeout, a
    backend removed with new allowed sources, a service removed."""
    sticky, hashed, udp = services
    drained = sticky.with_backends(
        (dataclasses.replace(sticky.backends[0], admin=AdminState.DRAIN), sticky.backends[1])
    )
    assert sticky.persistence is not None
    longer = dataclasses.replace(
        sticky, persistence=dataclasses.replace(sticky.persistence, timeout=90)
    )
    fewer = dataclasses.replace(
        hashed.with_backends(hashed.backends[:1]),
        allowed_sources=tuple(
            ipaddress.ip_network(n) for n in ("11.0.0.0/8", "12.0.0.0/8", "10.99.1.7")
        ),
    )
    return [
        [sticky],
        [sticky, hashed, udp],
        [drained, hashed, udp],
        [longer, fewer, udp],
        [longer, fewer],
        [],
    ]


async def test_changes_over_netlink_leave_the_same_ruleset_as_nft(topo: Topology) -> None:
    """lb encodes changes itself (offload/nft_netlink.py): after every step of the same
    sequence, the table reads back exactly as when `nft -f` applied the step's text."""
    states = edits(config("services:" + MIXED))
    seen: dict[str, list[str]] = {}
    for name, netlink in (("nft", None), ("netlink", NftNetlink(topo.lb))):
        dp = NftDataplane(netlink=netlink)
        steps = []
        for state in states:
            await apply(topo, dp, state)
            steps.append(nft_in(topo, "-s", "list", "ruleset"))
        seen[name] = steps
        with inside(topo.lb):
            await dp.remove_all()
    assert seen["netlink"] == seen["nft"]
    # each kind of pick: straight to the backends, or to their chains with persistence
    ruleset = "".join(seen["netlink"])
    assert "dnat ip to jhash ip saddr . tcp sport mod 3 seed 0x0 map {" in ruleset
    assert "dnat ip to numgen inc mod 2 map { 0 : 10.99.2.4 . 53" in ruleset
    assert "numgen inc mod 5 vmap { 0 : goto ep_" in ruleset
    assert "timeout 1m30s" in seen["netlink"][3]
    assert "ip saddr != @src_tcp_10_99_0_10_81 drop" in seen["netlink"][3]
    assert "svc_" not in seen["netlink"][-1] and "fw_" not in seen["netlink"][-1]


async def test_a_change_of_thousands_of_services_is_split_over_messages(topo: Topology) -> None:
    """A set's element list is one netlink attribute, whose length is 16 bits: a change
    adding 1,000 services of 10 backends at once (a node proxy's first sync after an
    empty start) goes in several messages of one batch, and every service is in the
    table."""
    n = 1000

    def backends(i: int) -> str:
        addresses = [i * 10 + j for j in range(10)]
        return ", ".join(f"{{address: '10.97.{a // 250}.{a % 250 + 1}:8080'}}" for a in addresses)

    services = config(
        "services:"
        + "".join(
            f"\n- {{name: s{i}, listen: '10.98.{i // 250}.{i % 250 + 1}:80', retries: 0,"
            f" backends: [{backends(i)}]}}"
            for i in range(n)
        )
    )
    dp = NftDataplane(netlink=NftNetlink(topo.lb))
    await apply(topo, dp, [])
    await apply(topo, dp, services)
    listing = nft_in(topo, "list", "ruleset")
    vips = [f"10.98.{i // 250}.{i % 250 + 1}" for i in range(n)]
    assert all(f" {vip} . tcp . 80 : goto svc_tcp_" in listing for vip in vips)
    with inside(topo.lb):
        await dp.remove_all()
