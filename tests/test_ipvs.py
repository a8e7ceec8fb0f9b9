"""The IPVS reconciler against an in-memory kernel: order, idempotency, ownership, drain."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest

from lb.changes import Changes
from lb.config import parse_config
from lb.model import Endpoint, IPAddress, IPNetwork, Mode, Protocol, Service, ServiceKey
from lb.persist import Affinity
from offload.ipvs import IpvsDataplane
from offload.ipvs_model import F_PERSISTENT, F_SCHED2, KConn, KDest, KService, sync_messages
from offload.ipvs_netlink import (
    DEL_DAEMON,
    NEW_DAEMON,
    backup_daemon_of,
    carries_data,
    daemon_command,
    genl_request,
    read_conn_table,
    read_templates,
)
from offload.policy import OffloadPolicy, demoting_form, kernel_service, not_expressible
from tests.support.doubles import apply_diff
from tests.support.fake_ipvs import FakeIpvs

VIP = ipaddress.ip_address("10.0.0.1")


def services(text: str) -> list[Service]:
    return list(parse_config(text).services)


WEB = """
services:
  - name: web
    listen: 10.0.0.1:80
    scheduler: wrr
    retries: 0
    persistence: {timeout: 120, netmask: 255.255.255.0}
    backends:
      - {address: 10.0.1.1:8080, weight: 3}
      - {address: 10.0.1.2:8080, weight: 1}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def owned_vip() -> set[IPAddress]:
    return {VIP}


def dataplane(
    fake: FakeIpvs, owned: set[IPAddress] | None = None, clock: Clock | None = None
) -> IpvsDataplane:
    owned = {VIP} if owned is None else owned

    async def vips() -> set[IPAddress]:
        return owned

    return IpvsDataplane(fake, vips, drain_timeout=60.0, clock=clock or Clock(), hold=fake.hold)


def order(fake: FakeIpvs, svc: Service) -> list[str]:
    return [f"{d.endpoint} w{d.weight}" for d in fake.lists[svc.key]]


async def test_adds_in_file_order_so_the_kernel_list_matches_userspace() -> None:
    fake = FakeIpvs()
    (web,) = services(WEB)
    await apply_diff(dataplane(fake), [web])
    assert fake.log == [
        "hold tcp/10.0.0.1:80",  # no new connection meets a service without destinations
        "add-service tcp/10.0.0.1:80 wrr",
        "add-dest 10.0.1.1:8080 w3",
        "add-dest 10.0.1.2:8080 w1",
        "release tcp/10.0.0.1:80",
    ]
    assert order(fake, web) == ["10.0.1.2:8080 w1", "10.0.1.1:8080 w3"]  # newest first
    k = fake.svcs[web.key]
    assert (k.flags, k.timeout, k.prefix_len) == (F_PERSISTENT, 120, 24)


async def test_second_apply_writes_nothing() -> None:
    fake = FakeIpvs()
    (web,) = services(WEB)
    dp = dataplane(fake)
    await apply_diff(dp, [web])
    writes = fake.writes
    await apply_diff(dp, [web])
    await apply_diff(dp, services(WEB))  # equal values, new objects
    assert fake.writes == writes


async def test_edits_are_minimal() -> None:
    fake = FakeIpvs()
    dp = dataplane(fake)
    await apply_diff(dp, services(WEB))
    fake.log.clear()
    await apply_diff(
        dp,
        services(WEB.replace("weight: 3", "weight: 5").replace("scheduler: wrr", "scheduler: rr")),
    )
    assert fake.log == [
        "hold tcp/10.0.0.1:80",  # a scheduler swap leaves the service without one for a moment
        "set-service tcp/10.0.0.1:80 rr",
        "release tcp/10.0.0.1:80",
        "set-dest 10.0.1.1:8080 w5",
    ]


async def test_foreign_services_are_never_touched() -> None:
    fake = FakeIpvs()
    (web,) = services(WEB)
    keepalived = KService(web.key, "rr")  # same VIP:port, but not on our device
    fake.svcs[web.key] = keepalived
    fake.lists[web.key] = [KDest(web.backends[0].address, 7)]
    other = services(WEB.replace("10.0.0.1:80", "10.9.9.9:80"))[0]
    fake.svcs[other.key] = KService(other.key, "wlc")
    fake.lists[other.key] = []
    dp = dataplane(fake, owned=set())
    await apply_diff(dp, [web])
    await apply_diff(dp, [])
    assert fake.writes == 0 and web.key in dp.foreign
    assert fake.svcs[web.key] is keepalived and other.key in fake.svcs


async def test_owned_services_no_longer_wanted_are_deleted() -> None:
    fake = FakeIpvs()
    dp = dataplane(fake)
    await apply_diff(dp, services(WEB))
    await apply_diff(dp, [])
    assert fake.svcs == {}


async def test_removed_backend_drains_then_goes_or_after_the_grace() -> None:
    """Once quiesced, a destination is deleted by a refresh (nothing else re-applies a
    service whose config did not change) when its connections are gone, or after the
    drain timeout."""
    fake = FakeIpvs()
    clock = Clock()
    dp = dataplane(fake, clock=clock)
    (web,) = services(WEB)
    await apply_diff(dp, [web])
    b2 = web.backends[1].address
    fake.set_conns(web.key, b2, active=2, inactive=1)
    fewer = services(WEB.replace("      - {address: 10.0.1.2:8080, weight: 1}\n", ""))
    await apply_diff(dp, fewer)
    assert order(fake, web) == ["10.0.1.2:8080 w0", "10.0.1.1:8080 w3"]  # quiesced, kept
    clock.now = 30
    await dp.refresh()
    assert len(fake.lists[web.key]) == 2
    fake.set_conns(web.key, b2, active=0, inactive=0)
    await dp.refresh()
    assert order(fake, web) == ["10.0.1.1:8080 w3"]
    writes = fake.writes
    await dp.refresh()
    assert fake.writes == writes  # nothing waits: a refresh writes nothing
    # and with connections that never end: gone after drain_timeout
    await apply_diff(dp, [web])
    fake.set_conns(web.key, b2, active=1)
    clock.now = 100
    await apply_diff(dp, fewer)
    clock.now = 159
    await dp.refresh()
    assert len(fake.lists[web.key]) == 2
    clock.now = 160
    await dp.refresh()
    assert order(fake, web) == ["10.0.1.1:8080 w3"]


async def test_down_backend_is_quiesced_not_removed() -> None:
    fake = FakeIpvs()
    dp = dataplane(fake)
    (web,) = services(WEB)
    await apply_diff(dp, [web])
    import dataclasses

    down = web.with_backends((web.backends[0], dataclasses.replace(web.backends[1], healthy=False)))
    await apply_diff(dp, [down])
    assert order(fake, web) == ["10.0.1.2:8080 w0", "10.0.1.1:8080 w3"]


async def test_demoting_form_sends_new_connections_to_the_local_listener() -> None:
    fake = FakeIpvs()
    dp = dataplane(fake)
    (web,) = services(WEB)
    await apply_diff(dp, [web])
    fake.set_conns(web.key, web.backends[0].address, active=3)
    fake.log.clear()
    await apply_diff(dp, [demoting_form(web)])
    k = fake.svcs[web.key]
    assert (k.scheduler, k.flags) == ("rr", 0)
    # held while the scheduler is swapped; the local destination comes before the quiescing,
    # so that new connections always have somewhere to go
    assert fake.log == [
        "hold tcp/10.0.0.1:80",
        "set-service tcp/10.0.0.1:80 rr",
        "release tcp/10.0.0.1:80",
        "add-dest 10.0.0.1:80 w1",
        "set-dest 10.0.1.1:8080 w0",
        "set-dest 10.0.1.2:8080 w0",
    ]
    assert order(fake, web) == ["10.0.0.1:80 w1", "10.0.1.2:8080 w0", "10.0.1.1:8080 w0"]
    assert fake.lists[web.key][0].fwd == 1  # local
    assert not dp.drained(web.key, keep=web.listen)
    fake.set_conns(web.key, web.backends[0].address, active=0)
    await dp.refresh()
    assert dp.drained(web.key, keep=web.listen)


async def test_observe_reports_kernel_counts_as_ipvs() -> None:
    fake = FakeIpvs()
    dp = dataplane(fake)
    (web,) = services(WEB)
    await apply_diff(dp, [web])
    fake.set_conns(web.key, web.backends[0].address, active=4, inactive=2)
    await dp.refresh()
    (snap,) = dp.observe()
    assert snap.dataplane == "ipvs" and snap.open == 4
    assert [(str(b.address), b.active, b.inactive) for b in snap.backends] == [
        ("10.0.1.2:8080", 0, 0),
        ("10.0.1.1:8080", 4, 2),
    ]


def test_kernel_form_of_flags() -> None:
    (dns,) = services(
        "services:\n - {name: d, protocol: udp, listen: 10.0.0.1:53, scheduler: sh, scheduler_flags: [sh-port]}\n"
    )
    assert kernel_service(dns).flags == F_SCHED2 and kernel_service(dns).prefix_len == 32


def test_what_cannot_be_offloaded_says_why() -> None:
    def why(extra: str, listen: str = "10.0.0.1:80", backend: str = "10.0.1.1:80") -> str | None:
        text = f"services:\n - name: s\n   listen: '{listen}'\n{extra}   backends: [{{address: '{backend}'}}]\n"
        return not_expressible(services(text)[0])

    assert why("   retries: 0\n") is None
    assert "connect retry is userspace-only (retries: 1" in str(why(""))
    assert "max_connections" in str(why("   retries: 0\n   max_connections: 5\n"))
    assert "loopback VIP" in str(why("   retries: 0\n", listen="127.0.0.1:80"))
    assert "loopback" in str(why("   retries: 0\n", backend="127.0.0.1:80"))
    assert "idle timeout" in str(why("   retries: 0\n   idle_timeout: 1m\n"))
    assert "access log" in str(why("   retries: 0\n   access_log: true\n"))
    # both kernel paths filter clients themselves (nft_rules.firewall_*)
    assert why("   retries: 0\n   allowed_sources: [10.9.0.0/16]\n") is None
    assert "IPv6" in str(
        why("   retries: 0\n", listen="[2001:db8::1]:80", backend="[2001:db8::2]:80")
    )
    udp = "services:\n - {name: u, protocol: udp, listen: 10.0.0.1:53, backends: [{address: 10.0.1.1:53}]}\n"
    assert not_expressible(services(udp)[0]) is None  # the UDP flow bound is not a blocker


def test_auto_policy_waits_for_calm_and_demotes_on_churn() -> None:
    (web,) = services(WEB)
    p = OffloadPolicy(Mode.AUTO, hold_down=10, churn_limit=3)
    p.observe([web], [], 0)
    assert not p.want(web.key, 5, False).kernel
    assert "waiting for 10s" in p.want(web.key, 5, False).reason
    assert p.due(9.9) == set()
    assert p.due(10) == {web.key}  # the timer that says when to look again
    assert p.want(web.key, 10, False).kernel
    changed = services(WEB.replace("weight: 3", "weight: 4"))
    p.observe(changed, [], 11)
    assert p.want(web.key, 11, True).kernel  # one change: stays in the kernel
    p.observe(services(WEB), [], 12)
    p.observe(services(WEB), [], 12.5)  # the same service again: not a change
    p.observe(changed, [], 13)
    w = p.want(web.key, 13, True)
    assert not w.kernel and w.reason.startswith("churn: 3 changes")
    assert p.want(web.key, 23, False).kernel  # calm again
    assert p.due(23) == {web.key}
    p.unavailable = "IPVS unavailable: no ip_vs"
    assert p.want(web.key, 100, False) == type(w)(False, "IPVS unavailable: no ip_vs")
    p.observe([], [web.key], 101)
    assert p.want(web.key, 101, False) == type(w)(False, "not in the config")


def test_ipvs_mode_offloads_at_once_and_userspace_never() -> None:
    (web,) = services(WEB)
    for mode, expected in ((Mode.IPVS, True), (Mode.USERSPACE, False)):
        p = OffloadPolicy(mode, 10, 3)
        p.observe([web], [], 0)
        assert p.want(web.key, 0, False).kernel is expected


def test_connection_table_parsing(tmp_path: Path) -> None:
    table = tmp_path / "ip_vs_conn"
    table.write_text(
        "Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\n"
        "TCP 0A630102 9C40 0A63000A 0050 0A630202 1F90 ESTABLISHED     898\n"
        "TCP 0A630103 9C41 0A63000A 0050 0A630203 1F90 TIME_WAIT        60\n"
        "UDP 0A630104 D431 0A63000A 0035 0A630205 14E9 UDP             295\n"
        "UDP 0A630105 D432 0A63000A 0035 0A630205 14E9 UDP             200\n"
        "TCP 0A630100 0000 0A63000A 0050 0A630202 1F90 NONE            100\n"
    )
    conns = read_conn_table(str(table))
    assert conns is not None and len(conns) == 4  # the template (client port 0) is left out
    first = conns[0]
    assert (str(first.client), str(first.vip), str(first.dest), first.state) == (
        "10.99.1.2:40000",
        "10.99.0.10:80",
        "10.99.2.2:8080",
        "ESTABLISHED",
    )
    assert [carries_data(c) for c in conns] == [True, False, True, False]
    assert read_conn_table(str(tmp_path / "missing")) is None


async def test_drained_looks_at_connection_states(tmp_path: Path) -> None:
    fake = FakeIpvs()
    (web,) = services(WEB)
    table: list[KConn] = []
    dp = IpvsDataplane(fake, _owned, conn_table=lambda: table)
    await apply_diff(dp, [web])
    vip, dest = web.listen, web.backends[0].address
    table.append(
        KConn(web.protocol, Endpoint.parse("10.9.9.9:1000"), vip, dest, "ESTABLISHED", 800)
    )
    await dp.refresh()
    assert not dp.drained(web.key)
    table[0] = KConn(web.protocol, Endpoint.parse("10.9.9.9:1000"), vip, dest, "TIME_WAIT", 100)
    await dp.refresh()
    assert dp.drained(web.key)  # a TIME_WAIT entry carries nothing any more


async def _owned() -> set[IPAddress]:
    return {VIP}


async def test_templates_are_read_from_the_connection_table_for_a_demote(tmp_path: Path) -> None:
    table = tmp_path / "ip_vs_conn"
    table.write_text(
        "Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\n"
        "TCP 0A630102 9C40 0A63000A 0050 0A630202 1F90 ESTABLISHED     898\n"
        "TCP 0A630100 0000 0A63000A 0050 0A630202 1F90 NONE            100\n"  # 10.99.1.0/24
        "TCP 0A630200 0000 0A63000A 0050 0A630203 1F90 NONE             42\n"
        "TCP 0A630300 0000 0A63000B 0050 0A630203 1F90 NONE             42\n"  # another VIP
        "UDP 0A630400 0000 0A63000A 0050 0A630203 1F90 NONE             42\n"  # another protocol
    )
    (web,) = services(WEB.replace("10.0.0.1:80", "10.99.0.10:80"))
    dp = IpvsDataplane(FakeIpvs(), _owned, template_table=lambda: read_templates(str(table)))
    got = sorted(
        (str(a.client), str(a.backend), a.remaining) for a in await dp.export_affinity(web.key)
    )
    assert got == [("10.99.1.0", "10.99.2.2:8080", 100.0), ("10.99.2.0", "10.99.2.3:8080", 42.0)]
    assert read_templates(str(tmp_path / "missing")) is None


class RecordingInjector:
    """Stands for the sync daemon: logs into the fake kernel's log, takes `takes` of them."""

    def __init__(self, fake: FakeIpvs, takes: int | None = None, fails: bool = False) -> None:
        self.fake = fake
        self.takes = takes
        self.fails = fails

    async def inject(self, key: ServiceKey, templates: Sequence[Affinity]) -> int:
        self.fake.log.append(f"inject {key} {[str(a.backend) for a in templates]}")
        if self.fails:
            raise OSError(17, "File exists")
        return len(templates) if self.takes is None else self.takes


async def test_templates_are_created_in_the_hold_once_the_real_servers_exist(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "lb.offload")
    fake = FakeIpvs()
    (web,) = services(WEB)
    dp = IpvsDataplane(fake, owned_vip, hold=fake.hold, injector=RecordingInjector(fake))
    assert dp.carries_affinity
    seeds = {web.key: [Affinity(ipaddress.ip_address("192.168.7.0"), web.backends[1].address, 30)]}
    await dp.apply([web], Changes([web]), seeds)
    assert fake.log == [
        "hold tcp/10.0.0.1:80",
        "add-service tcp/10.0.0.1:80 wrr",
        "add-dest 10.0.1.1:8080 w3",
        "add-dest 10.0.1.2:8080 w1",
        "inject tcp/10.0.0.1:80 ['10.0.1.2:8080']",  # before any client is scheduled
        "release tcp/10.0.0.1:80",
    ]
    # a service already in the kernel (lingering, its demoting form): the same, held
    fake.log.clear()
    await dp.apply([demoting_form(web)], Changes([demoting_form(web)]))
    fake.log.clear()
    await dp.apply([web], Changes([web]), seeds)
    assert fake.log[0] == "hold tcp/10.0.0.1:80"
    assert fake.log[-2:] == [
        "inject tcp/10.0.0.1:80 ['10.0.1.2:8080']",
        "release tcp/10.0.0.1:80",
    ]
    assert "1 of 1 persistence templates created" in caplog.text


async def test_templates_the_kernel_did_not_take_are_said(caplog: pytest.LogCaptureFixture) -> None:
    (web,) = services(WEB)
    client = ipaddress.ip_address("192.168.7.0")
    seeds = {web.key: [Affinity(client, b.address, 30) for b in web.backends]}
    for injector, said in (
        (RecordingInjector(FakeIpvs(), takes=1), "1 of 2 persistence templates created"),
        (
            RecordingInjector(FakeIpvs(), fails=True),
            "0 of 2 persistence templates created (FileExistsError",
        ),
    ):
        dp = IpvsDataplane(injector.fake, owned_vip, hold=injector.fake.hold, injector=injector)
        caplog.clear()
        await dp.apply([web], Changes([web]), seeds)
        assert web.key in injector.fake.svcs  # the service is carried all the same
        assert said in caplog.text
        assert any(r.levelname == "WARNING" for r in caplog.records)


async def test_without_an_injector_ipvs_does_not_carry_affinity() -> None:
    assert not dataplane(FakeIpvs()).carries_affinity


def test_sync_message_layout_matches_the_kernels() -> None:
    """The example of docs/dataplanes/ipvs.md: one template, client 192.168.7.10 to
    10.0.3.2:8080 behind 10.96.0.5:80, 600 s, sync id 7."""
    key = ServiceKey(Protocol.TCP, Endpoint.parse("10.96.0.5:80"))
    client = ipaddress.IPv4Address("192.168.7.10")
    (msg,) = sync_messages(key, [(client, Endpoint.parse("10.0.3.2:8080"), 599.2)], syncid=7)
    assert msg.hex() == (
        "0007002c01010000" "00060024" "00001000" "0000" "0000" "0050" "1f90"
        "00000000" "00000258" "c0a8070a" "0a600005" "0a000302"
    )  # fmt: skip


def test_sync_messages_fit_the_datagram_size() -> None:
    key = ServiceKey(Protocol.UDP, Endpoint.parse("10.96.0.5:53"))
    entries = [
        (ipaddress.IPv4Address(f"10.1.{i // 250}.{i % 250}"), Endpoint.parse("10.0.3.2:53"), 1.0)
        for i in range(81)
    ]
    messages = sync_messages(key, entries)
    assert [m[4] for m in messages] == [40, 40, 1]  # entries each
    assert [len(m) for m in messages] == [8 + 36 * 40, 8 + 36 * 40, 8 + 36]
    assert all(int.from_bytes(m[2:4], "big") == len(m) for m in messages)
    assert {m[9] for m in messages} == {17}  # UDP


def test_daemon_commands_are_ipvs_genl_messages() -> None:
    """IPVS_CMD_NEW_DAEMON / DEL_DAEMON as ipvsadm sends them: a nested DAEMON attribute
    with the backup state, the device's name and the sync id; the netlink round trip
    (family lookup, ack, the kernel's errno) runs here against nlctrl."""
    _, new = daemon_command(NEW_DAEMON, "lb0", 76)
    assert new.hex() == "1c0003000800010002000000080002006c623000080003004c000000"
    assert daemon_command(DEL_DAEMON)[1].hex() == "0c0003000800010002000000"
    genl_request("nlctrl", (3, bytes.fromhex("0b000200") + b"nlctrl\0" + b"\0"))  # acked
    families = genl_request("nlctrl", (3, b""), dump=True)  # a dump, to its end
    assert len(families) > 1
    daemon = bytes.fromhex("0b010000") + daemon_command(NEW_DAEMON, "lb0", 76)[1]
    assert backup_daemon_of([daemon]) == ("lb0", 76)  # as IPVS_CMD_GET_DAEMON answers
    assert backup_daemon_of([]) is None
    with pytest.raises(OSError) as e:
        genl_request("no-such-family", daemon_command(NEW_DAEMON, "lb0", 76))
    assert e.value.errno == 2


async def test_a_filtered_service_reaches_ipvs_only_behind_its_filter() -> None:
    """IPVS cannot filter clients: the host's filter of `allowed_sources` (Host.set_filters)
    is written before the service is, follows an edit of the sources alone, and goes only
    once the service has; without a filter the service stays in userspace."""
    fake = FakeIpvs()

    async def filters(
        sources: Mapping[ServiceKey, Iterable[IPNetwork]], *, whole: bool = False
    ) -> None:
        given = "; ".join(f"{k} {[str(n) for n in v]}" for k, v in sorted(sources.items()))
        fake.log.append(f"filter{' whole' if whole else ''} {given}")

    dp = IpvsDataplane(fake, owned_vip, hold=fake.hold, filters=filters)
    (web,) = services(
        WEB.replace("    retries: 0\n", "    retries: 0\n    allowed_sources: [10.9.0.0/16]\n")
    )
    assert dp.not_expressible(web) is None
    await apply_diff(dp, [web])
    assert fake.log[:2] == [
        "filter tcp/10.0.0.1:80 ['10.9.0.0/16']",
        "hold tcp/10.0.0.1:80",
    ]
    assert fake.log[-1] == "filter whole tcp/10.0.0.1:80 ['10.9.0.0/16']"
    fake.log.clear()
    wider = dataclasses.replace(web, allowed_sources=(ipaddress.ip_network("10.0.0.0/8"),))
    await apply_diff(dp, [wider])
    assert fake.log == ["filter tcp/10.0.0.1:80 ['10.0.0.0/8']"]  # IPVS untouched
    fake.log.clear()
    await apply_diff(dp, [])
    assert fake.log == ["del-service tcp/10.0.0.1:80", "filter tcp/10.0.0.1:80 []"]
    # no nft on the host: no filter, so such a service is not IPVS's
    reason = IpvsDataplane(FakeIpvs(), owned_vip).not_expressible(web)
    assert reason is not None and "allowed_sources need nft" in reason
