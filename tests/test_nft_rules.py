"""The nftables rendering and its transactions, without a kernel (tests/test_nftables.py
runs them against the real one)."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from lb.config import parse_config
from lb.model import AdminState, Endpoint, Protocol, Service, ServiceKey
from lb.persist import Affinity
from offload.nft_rules import (
    MAX_CYCLE,
    Names,
    affinity_ops,
    base_script,
    cycle,
    diff_ops,
    diff_script,
    firewall_of,
    not_expressible_nft,
    render,
    service_id,
    shard_of,
    with_affinity,
)
from offload.nftables import NftDataplane, NftError
from tests.support.doubles import apply_diff
from tests.support.vs import Harness, name_of


def services(text: str) -> list[Service]:
    return list(parse_config(text).services)


def svc(
    scheduler: str = "wrr", extra: str = "", n: int = 1, weights: str = "3,2,1"
) -> list[Service]:
    out = []
    for i in range(n):
        backends = ", ".join(
            f"{{address: '192.168.1.{j + 1}:8080', weight: {w}}}"
            for j, w in enumerate(weights.split(","))
        )
        out.append(
            f"  - {{name: s{i}, listen: '10.0.{i // 250}.{i % 250 + 1}:80', scheduler: {scheduler}, "
            f"retries: 0, backends: [{backends}]{extra}}}"
        )
    return services("services:\n" + "\n".join(out))


class FakeNft:
    def __init__(self) -> None:
        self.scripts: list[str] = []

    async def __call__(self, script: str) -> str:
        self.scripts.append(script)
        return '{"nftables": []}'


def test_wrr_cycle_is_the_userspace_reference_cycle() -> None:
    (s,) = svc("wrr", weights="3,2,1")
    h = Harness("wrr").add("A", 3).add("B", 2).add("C", 1)
    assert "".join(name_of(e) for e in cycle(s)) == h.picks(6) == "CBAABA"
    (r,) = svc("rr", weights="1,1,1")
    assert "".join(name_of(e) for e in cycle(r)) == "CBA"  # newest first, as the kernel's list


def test_cycle_skips_backends_that_take_no_new_connections() -> None:
    (s,) = svc("wrr", weights="4,0,2")
    down = dataclasses.replace(s.backends[2], healthy=False)
    drained = s.with_backends((s.backends[0], s.backends[1], down))
    assert "".join(name_of(e) for e in cycle(s)) == "CAA"  # 4:2 over their gcd
    assert "".join(name_of(e) for e in cycle(drained)) == "A"


def test_rendered_service_picks_through_numgen_and_dnats_in_one_rule() -> None:
    """Without persistence a service is one chain of one rule: no chain per backend (the
    kernel walks every chain of the namespace at each commit)."""
    (s,) = svc("wrr", weights="3,2,1")
    r = render(s)
    sid = service_id(s.key)
    assert sid == "tcp_10_0_0_1_80" and r.chain == "svc_tcp_10_0_0_1_80"
    (rule,) = r.rules
    assert rule.nft() == (
        "meta l4proto tcp dnat ip to numgen inc mod 6 map { 0 : 192.168.1.3 . 8080, "
        "1 : 192.168.1.2 . 8080, 2 : 192.168.1.1 . 8080, 3 : 192.168.1.1 . 8080, "
        "4 : 192.168.1.2 . 8080, 5 : 192.168.1.1 . 8080 }"
    )
    assert r.endpoints == {} and r.sets == {}
    # each backend's counter lives in table lb, found by the conns map
    ops = diff_script(None, r)
    assert "add counter ip lb c_tcp_10_0_0_1_80_192_168_1_2_8080" in ops
    assert (
        "add element ip lb conns { 10.0.0.1 . tcp . 80 . 192.168.1.1 . 8080 : "
        '"c_tcp_10_0_0_1_80_192_168_1_1_8080", '
    ) in ops[3]


def test_persistence_renders_affinity_sets_checked_before_the_pick() -> None:
    (s,) = svc("rr", ", persistence: {timeout: 60, netmask: 255.255.255.0}", weights="1,1")
    r = render(s)
    assert r.rules[0].nft() == (
        "ip saddr & 255.255.255.0 @aff_tcp_10_0_0_1_80_192_168_1_2_8080 "
        "goto ep_tcp_10_0_0_1_80_192_168_1_2_8080"
    )
    assert "timeout 60s" in r.sets["aff_tcp_10_0_0_1_80_192_168_1_1_8080"].nft()
    assert r.endpoints["ep_tcp_10_0_0_1_80_192_168_1_1_8080"][1].nft() == (
        "update @aff_tcp_10_0_0_1_80_192_168_1_1_8080 { ip saddr & 255.255.255.0 } "
        "meta l4proto tcp dnat to 192.168.1.1:8080"
    )
    assert (
        r.rules[-1]
        .nft()
        .startswith("numgen inc mod 2 vmap { 0 : goto ep_tcp_10_0_0_1_80_192_168_1_2_8080")
    )


def test_sh_hashes_the_client_over_weighted_slots() -> None:
    (s,) = svc("sh", ", scheduler_flags: [sh-port]", weights="2,1")
    (rule,) = render(s).rules
    assert rule.nft() == (
        "meta l4proto tcp dnat ip to jhash ip saddr . th sport mod 3 seed 0x0 map { "
        "0 : 192.168.1.2 . 8080, 1 : 192.168.1.1 . 8080, 2 : 192.168.1.1 . 8080 }"
    )


def test_what_nftables_cannot_express() -> None:
    assert "not expressible in nftables" in (not_expressible_nft(svc("wlc")[0]) or "")
    assert "sh-fallback" in (
        not_expressible_nft(svc("sh", ", scheduler_flags: [sh-fallback]")[0]) or ""
    )
    (s,) = svc("wrr", weights=f"{MAX_CYCLE},1")
    assert "longer than" in (not_expressible_nft(s) or "")
    assert not_expressible_nft(svc("rr")[0]) is None


def test_no_backend_left_takes_the_service_out_of_the_map() -> None:
    (s,) = svc("rr", weights="1")
    off = s.with_backends((dataclasses.replace(s.backends[0], admin=AdminState.DRAIN),))
    script = diff_script(render(s), render(off))
    t = shard_of(s.key)
    assert script[0] == f"delete element ip {t} services {{ 10.0.0.1 . tcp . 80 }}"
    assert not any("add element" in line for line in script)
    back = diff_script(render(off), render(s))
    assert (
        back[-1]
        == f"add element ip {t} services {{ 10.0.0.1 . tcp . 80 : goto svc_tcp_10_0_0_1_80 }}"
    )


async def test_one_change_rewrites_one_service_whatever_the_count() -> None:
    fake = FakeNft()
    dp = NftDataplane(fake)
    many = svc("wrr", n=500)
    await apply_diff(dp, many)
    assert dp.writes == 1 and fake.scripts[0].startswith("table ip lb\ndelete table ip lb\n")
    await apply_diff(dp, many)
    assert dp.writes == 1  # nothing changed, nothing sent
    edited = list(many)
    edited[250] = edited[250].with_backends(
        (dataclasses.replace(edited[250].backends[0], weight=5), *edited[250].backends[1:])
    )
    await apply_diff(dp, edited)
    script = fake.scripts[-1]
    sid = service_id(edited[250].key)
    assert dp.writes == 2
    assert all(sid in line for line in script.splitlines()), script
    # the edited backend's chain keeps its counter; the others are left as they were
    t = shard_of(edited[250].key)
    assert f"flush chain ip {t} svc_{sid}" in script and "add counter" not in script
    small = NftDataplane(FakeNft())
    await apply_diff(small, many[:5])
    edited_small = [*many[:4], edited[250]]
    await apply_diff(small, edited_small)
    assert small.writes == 2


async def test_a_removed_service_loses_every_object() -> None:
    fake = FakeNft()
    dp = NftDataplane(fake)
    (s,) = svc("rr", ", persistence: {timeout: 60}", weights="1,1")
    await apply_diff(dp, [s])
    await apply_diff(dp, [])
    pins, *script = fake.scripts[-1].splitlines()
    sid = service_id(s.key)
    # no hairpin path left either
    assert pins == (
        "delete element ip lb masq_paths { 192.168.1.1 . 192.168.1.1 . tcp . 8080, "
        "192.168.1.2 . 192.168.1.2 . tcp . 8080 }"
    )
    t = shard_of(s.key)
    assert script[0] == f"delete element ip {t} services {{ 10.0.0.1 . tcp . 80 }}"
    assert script[-1] == f"delete chain ip {t} svc_{sid}"
    assert sum(line.startswith("delete set") for line in script) == 2
    assert sum(line.startswith("delete counter") for line in script) == 2


def test_a_new_persistence_timeout_recreates_the_sets_and_the_chains_using_them() -> None:
    (a,) = svc("rr", ", persistence: {timeout: 60}", weights="1,1")
    (b,) = svc("rr", ", persistence: {timeout: 90}", weights="1,1")
    script = diff_script(render(a), render(b))
    for ep in ("192_168_1_1_8080", "192_168_1_2_8080"):
        t = shard_of(a.key)
        flush = script.index(f"flush chain ip {t} ep_tcp_10_0_0_1_80_{ep}")
        delete = script.index(f"delete set ip {t} aff_tcp_10_0_0_1_80_{ep}")
        add = script.index(
            f"add set ip {t} aff_tcp_10_0_0_1_80_{ep} "
            + render(b).sets[f"aff_tcp_10_0_0_1_80_{ep}"].nft()
        )
        rule = next(
            i
            for i, line in enumerate(script)
            if line.startswith(f"add rule ip {t} ep_tcp_10_0_0_1_80_{ep} ")
        )
        # a set still referenced cannot be deleted: its users are flushed first, then refilled
        assert flush < delete < add < rule


def test_services_spread_over_the_shard_tables_and_stay_there() -> None:
    many = svc("rr", n=500)
    tables = [render(s).table for s in many]
    assert set(tables) == {f"lb_{i}" for i in range(16)}
    assert max(tables.count(t) for t in set(tables)) < 500 / 16 * 2  # roughly even
    assert tables == [shard_of(s.key) for s in many] == [render(s).table for s in many]


async def test_a_refused_change_makes_the_next_apply_rebuild_the_tables() -> None:
    fake = FakeNft()
    dp = NftDataplane(fake)
    many = svc("rr", n=3)
    await apply_diff(dp, many)
    copies = [dataclasses.replace(s) for s in many]  # equal, other objects: nothing to send
    await apply_diff(dp, copies)
    assert dp.writes == 1

    async def refuse(script: str) -> str:
        raise NftError("refused")

    dp.nft = refuse
    with pytest.raises(NftError):
        await apply_diff(dp, copies[:2])
    dp.nft = fake
    await apply_diff(dp, copies[:2])
    assert fake.scripts[-1].startswith("table ip lb\ndelete table ip lb\n")
    assert "10.0.0.3" not in fake.scripts[-1] and "10.0.0.2" in fake.scripts[-1]


def test_conntrack_lines_give_each_flows_service_and_backend() -> None:
    """`conntrack -L --dst-nat` output as the tool prints it (captured here)."""
    from offload.conntrack import Flow, parse_flows

    text = (
        "tcp      6 119 TIME_WAIT src=10.9.0.1 dst=10.96.0.1 sport=39226 dport=80 "
        "src=10.9.0.2 dst=10.9.0.1 sport=8080 dport=39226 [ASSURED] mark=0 use=1\n"
        "tcp      6 431999 ESTABLISHED src=10.9.0.1 dst=10.96.0.1 sport=39228 dport=80 "
        "src=10.9.0.3 dst=10.9.0.1 sport=8080 dport=39228 [ASSURED] mark=0 use=1\n"
        "udp      17 29 src=10.0.0.1 dst=10.96.0.1 sport=1000 dport=53 src=10.244.0.5 "
        "dst=10.0.0.1 sport=5353 dport=1000 mark=0 use=1\n"
        "icmp     1 29 src=10.0.0.1 dst=10.96.0.1 type=8 code=0 id=1 src=10.96.0.1 "
        "dst=10.0.0.1 type=0 code=0 id=1 mark=0 use=1\n"
        "tcp      6 100 ESTABLISHED src=10.0.0.2 dst=10.0.0.9 sport=1 dport=80 "
        "src=10.0.0.9 dst=10.0.0.2 sport=80 dport=1 [ASSURED] mark=0 use=1\n"
    )
    web = ServiceKey(Protocol.TCP, Endpoint.parse("10.96.0.1:80"))
    dns = ServiceKey(Protocol.UDP, Endpoint.parse("10.96.0.1:53"))
    assert parse_flows(text) == [
        Flow(web, Endpoint.parse("10.9.0.2:8080"), False),
        Flow(web, Endpoint.parse("10.9.0.3:8080"), True),
        Flow(dns, Endpoint.parse("10.244.0.5:5353"), False),
    ]  # icmp and the entry that was not DNATed are left out


def test_affinity_goes_into_the_backends_sets_before_the_service_is_in_the_map() -> None:
    (web,) = services(
        "services:\n- name: web\n  listen: 10.0.0.1:80\n  scheduler: rr\n  retries: 0\n"
        "  persistence: {timeout: 60, netmask: /24}\n"
        "  backends: [{address: 10.0.1.1:8080}, {address: 10.0.1.2:8080}]\n"
    )
    r = render(web)
    a, b = (x.address for x in web.backends)
    net = ipaddress.ip_address("10.9.9.0")
    seeds = affinity_ops(
        r,
        [
            Affinity(net, b, 12.5),
            Affinity(ipaddress.ip_address("10.9.8.0"), b, 1.0),
            Affinity(net, Endpoint.parse("10.0.1.9:8080"), 5.0),  # not a backend: left out
            Affinity(ipaddress.ip_address("10.9.7.0"), a, 0.0),  # expired: left out
        ],
    )
    (op,) = seeds
    assert op.nft() == (
        f"add element ip {r.table} {Names.of(web.key, b).affinity} "
        "{ 10.9.8.0 timeout 1000ms, 10.9.9.0 timeout 12500ms }"
    )
    ops = with_affinity(diff_ops(None, r), seeds)
    kinds = [type(o).__name__ for o in ops]
    assert kinds.index("AddAffinity") > max(i for i, k in enumerate(kinds) if k == "AddSet")
    assert kinds.index("AddAffinity") == kinds.index("AddService") - 1
    assert with_affinity(ops, []) == ops


def test_allowed_sources_render_a_filter_that_comes_before_the_service() -> None:
    """A service with `allowed_sources`: its chain `fw_<id>` in table lb drops a client
    outside the interval set `src_<id>` (IPv4 networks, merged), reached through the map
    `firewall` from filter chains that run before DNAT, for new connections only."""
    (s,) = svc(
        "rr",
        ", allowed_sources: [10.1.0.0/16, 10.1.2.0/24, 192.168.1.7, '2001:db8::/32']",
        weights="1",
    )
    r = render(s)
    assert r.firewall is not None and r.firewall.table == "lb"
    sid = service_id(s.key)
    script = diff_script(None, r)
    assert script[:4] == [
        f"add set ip lb src_{sid} "
        "{ type ipv4_addr; flags interval; elements = { 10.1.0.0/16, 192.168.1.7 }; }",
        f"add chain ip lb fw_{sid}",
        f"add rule ip lb fw_{sid} ip saddr != @src_{sid} drop",
        f"add element ip lb firewall {{ 10.0.0.1 . tcp . 80 : goto fw_{sid} }}",
    ]
    # in the transaction that makes the service, before its map element
    assert script[-1].startswith(f"add element ip {shard_of(s.key)} services ")
    table_lb = "\n".join(base_script())
    for hook in ("prerouting", "output"):
        assert f"type filter hook {hook} priority -110; policy accept;" in table_lb
    assert "ct state new ip daddr . meta l4proto . th dport vmap @firewall" in table_lb
    # no allowed_sources: no filter, nothing in table lb but the counters
    (plain,) = svc("rr", weights="1")
    assert render(plain).firewall is None
    assert not any(
        "firewall" in line or "src_" in line for line in diff_script(None, render(plain))
    )


def test_sources_of_no_ipv4_network_let_no_ipv4_client_in() -> None:
    """As the userspace proxy's check: an IPv6 range never matches an IPv4 client, so a
    list of IPv6 ranges only leaves the set empty (everyone dropped); 0.0.0.0/0 is everyone."""
    (v6,) = svc("rr", ", allowed_sources: ['2001:db8::/32']", weights="1")
    r = render(v6)
    assert r.firewall is not None and r.firewall.spec.networks == ()
    assert r.firewall.spec.nft() == "{ type ipv4_addr; flags interval; }"
    (anyone,) = svc("rr", ", allowed_sources: [0.0.0.0/0]", weights="1")
    assert "elements = { 0.0.0.0/0 }" in diff_script(None, render(anyone))[0]
    ipv6 = ServiceKey(Protocol.TCP, Endpoint.parse("[2001:db8::1]:80"))
    assert firewall_of(ipv6, [ipaddress.ip_network("2001:db8::/32")]) is None  # not offloaded


def test_an_edit_of_allowed_sources_replaces_only_that_services_set() -> None:
    (s,) = svc("rr", ", allowed_sources: [10.1.0.0/16]", weights="1,1")
    wider = dataclasses.replace(s, allowed_sources=(ipaddress.ip_network("10.0.0.0/8"),))
    sid = service_id(s.key)
    # the chain's rule goes first, so that the set can go; map element and service untouched
    assert diff_script(render(s), render(wider)) == [
        f"flush chain ip lb fw_{sid}",
        f"delete set ip lb src_{sid}",
        f"add set ip lb src_{sid} "
        "{ type ipv4_addr; flags interval; elements = { 10.0.0.0/8 }; }",
        f"add rule ip lb fw_{sid} ip saddr != @src_{sid} drop",
    ]
    # a backend edit leaves the filter alone
    drained = s.with_backends(
        (dataclasses.replace(s.backends[0], admin=AdminState.DRAIN), s.backends[1])
    )
    edit = diff_script(render(s), render(drained))
    assert edit and not any("fw_" in line or "src_" in line for line in edit)
    # sources dropped: the filter goes, the service stays
    opened = dataclasses.replace(s, allowed_sources=())
    assert diff_script(render(s), render(opened)) == [
        "delete element ip lb firewall { 10.0.0.1 . tcp . 80 }",
        f"flush chain ip lb fw_{sid}",
        f"delete set ip lb src_{sid}",
        f"delete chain ip lb fw_{sid}",
    ]
    # and the service removed: its filter with it
    gone = diff_script(render(s), None)
    assert gone[:4] == diff_script(render(s), render(opened))
    assert gone[-1] == f"delete chain ip {shard_of(s.key)} svc_{sid}"


async def test_one_services_filter_edit_is_one_small_transaction_whatever_the_count() -> None:
    fake = FakeNft()
    dp = NftDataplane(fake)
    many = svc("rr", ", allowed_sources: [10.1.0.0/16]", n=300, weights="1")
    await apply_diff(dp, many)
    edited = list(many)
    edited[150] = dataclasses.replace(
        edited[150], allowed_sources=(ipaddress.ip_network("10.2.0.0/16"),)
    )
    await apply_diff(dp, edited)
    script = fake.scripts[-1].splitlines()
    sid = service_id(edited[150].key)
    assert dp.writes == 2 and len(script) == 4
    assert all(sid in line for line in script), script
