"""Kubernetes Services + EndpointSlices -> lb services: every kube-proxy translation rule,
on the objects as the API serves them (tests/support/kube_double.py builds kubectl's JSON shapes)."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from lb.k8s.translate import (
    SERVICE_NAME_LABEL,
    Memo,
    Node,
    node_addresses,
    node_zone,
    slice_owner,
    translate,
    translate_changed,
)
from lb.model import Endpoint, Persistence, Protocol, SchedulerName, Service
from tests.support.kube_double import endpoint, endpoint_slice, node, service

NODE = Node("node-1", (ipaddress.ip_address("192.168.0.10"),))


def one(services: list[dict[str, Any]], slices: list[dict[str, Any]]) -> list[Service]:
    return list(translate(services, slices, NODE).services)


def addresses(s: Service) -> list[str]:
    return [str(b.address) for b in s.backends]


def web(**kw: Any) -> dict[str, Any]:
    return service("web", **kw)


def web_slice(*eps: dict[str, Any], name: str = "web-abc12", **kw: Any) -> dict[str, Any]:
    return endpoint_slice(name, "web", endpoints=list(eps), **kw)


def test_cluster_ip_port_maps_to_target_port_with_kube_proxy_name() -> None:
    [s] = one([web()], [web_slice(endpoint("10.244.1.5"), endpoint("10.244.2.7"))])
    assert s.name == "default/web:http"
    assert s.protocol is Protocol.TCP
    assert s.listen == Endpoint.parse("10.96.0.10:80")
    assert addresses(s) == ["10.244.1.5:8080", "10.244.2.7:8080"]
    assert s.scheduler is SchedulerName.RR and s.persistence is None


def test_one_lb_service_per_port_and_protocol() -> None:
    ports = [
        {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "targetPort": 5353, "protocol": "TCP"},
    ]
    slice_ports = [
        {"name": "dns", "port": 5353, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 5353, "protocol": "TCP"},
    ]
    out = one([web(ports=ports)], [web_slice(endpoint("10.244.1.5"), ports=slice_ports)])
    assert {(s.name, s.protocol, str(s.listen)) for s in out} == {
        ("default/web:dns", Protocol.UDP, "10.96.0.10:53"),
        ("default/web:dns-tcp", Protocol.TCP, "10.96.0.10:53"),
    }
    assert all(addresses(s) == ["10.244.1.5:5353"] for s in out)


def test_named_target_port_is_resolved_through_the_slice_ports() -> None:
    ports = [{"name": "http", "port": 80, "targetPort": "web-port", "protocol": "TCP"}]
    # the EndpointSlice controller resolved "web-port" to each pod's container port
    [s] = one(
        [web(ports=ports)],
        [
            web_slice(
                endpoint("10.244.1.5"), ports=[{"name": "http", "port": 9376, "protocol": "TCP"}]
            )
        ],
    )
    assert addresses(s) == ["10.244.1.5:9376"]


def test_slices_of_other_services_ports_or_namespaces_are_not_used() -> None:
    other_ns = endpoint_slice("web-x", "web", namespace="other", endpoints=[endpoint("10.1.1.1")])
    other_svc = endpoint_slice("api-x", "api", endpoints=[endpoint("10.1.1.2")])
    other_port = web_slice(
        endpoint("10.1.1.3"),
        name="web-y",
        ports=[{"name": "metrics", "port": 9090, "protocol": "TCP"}],
    )
    [s] = one([web()], [other_ns, other_svc, other_port, web_slice(endpoint("10.244.1.5"))])
    assert addresses(s) == ["10.244.1.5:8080"]


def test_backends_from_several_slices_once_each() -> None:
    [s] = one(
        [web()],
        [
            web_slice(endpoint("10.244.1.5"), endpoint("10.244.1.6"), name="web-a"),
            web_slice(endpoint("10.244.1.6"), endpoint("10.244.1.7"), name="web-b"),
        ],
    )
    assert addresses(s) == ["10.244.1.5:8080", "10.244.1.6:8080", "10.244.1.7:8080"]


def test_headless_external_name_and_other_proxys_services_are_ignored() -> None:
    headless = service("db", cluster_ip="None")
    external = service("ext", type="ExternalName")
    foreign = service(
        "mesh", cluster_ip="10.96.0.20", labels={"service.kubernetes.io/service-proxy-name": "x"}
    )
    slices = [
        endpoint_slice("db-a", "db", endpoints=[endpoint("10.1.0.1")]),
        endpoint_slice("mesh-a", "mesh", endpoints=[endpoint("10.1.0.2")]),
    ]
    assert one([headless, external, foreign], slices) == []


def test_client_ip_affinity_is_persistence_per_address_with_default_timeout() -> None:
    [default] = one([web(session_affinity=10800)], [])
    assert default.persistence == Persistence(10800, 32)
    [short] = one([web(session_affinity=60)], [])
    assert short.persistence == Persistence(60, 32)


def test_ready_endpoints_serve_terminating_only_when_none_is_ready_unready_never() -> None:
    unready = endpoint("10.244.0.9", ready=False, serving=False)
    draining = endpoint("10.244.0.8", ready=False, serving=True, terminating=True)
    [s] = one([web()], [web_slice(endpoint("10.244.1.5"), draining, unready)])
    assert addresses(s) == ["10.244.1.5:8080"]
    [s] = one([web()], [web_slice(draining, unready)])
    assert addresses(s) == ["10.244.0.8:8080"]
    [s] = one([web()], [web_slice(unready)])
    assert addresses(s) == []
    stopping = endpoint("10.244.0.7", ready=False, serving=False, terminating=True)
    [s] = one([web()], [web_slice(stopping)])
    assert addresses(s) == []


def test_internal_traffic_policy_local_keeps_this_nodes_endpoints() -> None:
    eps = [endpoint("10.244.1.5", node_name="node-1"), endpoint("10.244.2.7", node_name="node-2")]
    [s] = one([web(internal_traffic_policy="Local")], [web_slice(*eps)])
    assert addresses(s) == ["10.244.1.5:8080"]
    [s] = one([web(internal_traffic_policy="Cluster")], [web_slice(*eps)])
    assert addresses(s) == ["10.244.1.5:8080", "10.244.2.7:8080"]


def test_node_port_listens_on_the_node_addresses() -> None:
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}]
    out = one([web(type="NodePort", ports=ports)], [web_slice(endpoint("10.244.1.5"))])
    assert {(s.name, str(s.listen)) for s in out} == {
        ("default/web:http", "10.96.0.10:80"),
        ("default/web:http@192.168.0.10:30080", "192.168.0.10:30080"),
    }
    assert all(addresses(s) == ["10.244.1.5:8080"] for s in out)


def test_node_addresses_come_from_the_node_object() -> None:
    n = node("node-1", "192.168.0.10", external_ip="203.0.113.5")
    assert [str(a) for a in node_addresses(n)] == ["192.168.0.10", "203.0.113.5"]
    assert node_addresses(None) == ()


def test_scheduler_annotation_and_a_bad_one_is_reported() -> None:
    [s] = one([web(annotations={"lb.io/scheduler": "wrr"})], [])
    assert s.scheduler is SchedulerName.WRR
    t = translate([web(annotations={"lb.io/scheduler": "fastest"})], [], NODE)
    assert t.services[0].scheduler is SchedulerName.RR
    assert any("'fastest' is not a scheduler" in line for line in t.skipped)
    t = translate([web()], [], NODE, default_scheduler=SchedulerName.MH)
    assert t.services[0].scheduler is SchedulerName.MH


def test_sctp_ports_are_skipped_with_a_reason() -> None:
    ports = [{"name": "s", "port": 9, "targetPort": 9, "protocol": "SCTP"}]
    t = translate([web(ports=ports)], [], NODE)
    assert t.services == ()
    assert t.skipped == ("default/web:s: protocol SCTP is not proxied (tcp, udp)",)


def test_two_services_claiming_one_address_first_wins_and_the_other_is_reported() -> None:
    a = service("a", cluster_ip="10.96.0.30")
    b = service("b", cluster_ip="10.96.0.30")
    t = translate([b, a], [], NODE)
    assert [s.name for s in t.services] == ["default/a:http"]
    assert t.skipped == ("default/b:http: tcp 10.96.0.30:80 is already used by default/a",)


def test_a_sync_remakes_only_the_services_whose_objects_changed() -> None:
    """With a memo, unchanged Service and EndpointSlice objects (the informers keep them
    as they were) give the very lb services of last time; a changed slice, its service's."""
    from lb.k8s.translate import Memo

    svcs = [service(f"s{i}", cluster_ip=f"10.96.0.{i + 1}") for i in range(3)]
    slices = [
        endpoint_slice(f"s{i}-abc", f"s{i}", endpoints=[endpoint(f"10.244.0.{i + 1}")])
        for i in range(3)
    ]
    memo = Memo()
    first = translate(svcs, slices, NODE, memo=memo).services
    again = translate(svcs, slices, NODE, memo=memo).services
    assert all(a is b for a, b in zip(first, again, strict=True))
    slices[1] = endpoint_slice("s1-abc", "s1", endpoints=[endpoint("10.244.9.9")])
    third = translate(svcs, slices, NODE, memo=memo).services
    assert third[0] is first[0] and third[2] is first[2]
    assert addresses(third[1]) == ["10.244.9.9:8080"]
    assert third == translate(svcs, slices, NODE).services  # what no memo gives
    moved = Node("node-1", (ipaddress.ip_address("192.168.0.11"),))
    fourth = translate(svcs, slices, moved, memo=memo).services
    assert fourth[0] is not third[0] and fourth == third  # another node: made again


def test_translated_services_are_ones_a_kernel_dataplane_can_carry() -> None:
    """No connect retry (kube-proxy has none): otherwise no Service would ever leave
    userspace on a node running the nftables or IPVS dataplane."""
    from offload.nftables import NftDataplane

    ports = [
        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"},
    ]
    slice_ports = [
        {"name": "http", "port": 8080, "protocol": "TCP"},
        {"name": "dns", "port": 53, "protocol": "UDP"},
    ]
    out = one([web(ports=ports)], [web_slice(endpoint("10.244.1.5"), ports=slice_ports)])
    assert len(out) == 2
    for s in out:
        assert NftDataplane().not_expressible(s) is None, s.name


def test_health_check_node_port_counts_this_nodes_ready_endpoints() -> None:
    lb_svc = service("edge", type="LoadBalancer")
    lb_svc["spec"] |= {"externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}
    slices = [
        endpoint_slice(
            "edge-a",
            "edge",
            endpoints=[
                endpoint("10.244.1.5"),
                endpoint("10.244.1.6", ready=False),  # not ready: not counted
                endpoint("10.244.2.7", node_name="node-2"),  # another node's
            ],
        ),
        endpoint_slice("edge-b", "edge", endpoints=[endpoint("10.244.1.8")]),
    ]
    t = translate([lb_svc], slices, Node("node-1", (ipaddress.ip_address("192.168.0.10"),)))
    (check,) = t.health_checks
    assert (check.service, check.port, check.local_endpoints) == (("default", "edge"), 32000, 2)
    cluster = service("edge", type="LoadBalancer")  # externalTrafficPolicy: Cluster
    cluster["spec"]["healthCheckNodePort"] = 32000
    assert translate([cluster], slices, Node("node-1")).health_checks == ()


def hinted(ip: str, zones: tuple[str, ...] = (), nodes: tuple[str, ...] = ()) -> dict[str, Any]:
    e = endpoint(ip, node_name="elsewhere")
    hints: dict[str, Any] = {}
    if zones:
        hints["forZones"] = [{"name": z} for z in zones]
    if nodes:
        hints["forNodes"] = [{"name": n} for n in nodes]
    if hints:
        e["hints"] = hints
    return e


def test_topology_hints_and_kube_proxys_fall_backs() -> None:
    here = Node("node-1", (ipaddress.ip_address("192.168.0.10"),), zone="zone-a")

    def picked(*eps: dict[str, Any], node: Node = here) -> list[str]:
        (s,) = translate([web()], [web_slice(*eps)], node).services
        return addresses(s)

    a1, a2 = hinted("10.244.1.1", ("zone-a",)), hinted("10.244.1.2", ("zone-a",))
    b = hinted("10.244.2.1", ("zone-b",))
    assert picked(a1, a2, b) == ["10.244.1.1:8080", "10.244.1.2:8080"]  # same zone
    everyone = ["10.244.1.1:8080", "10.244.2.1:8080", "10.244.3.1:8080"]
    # one ready endpoint without a hint: hints are ignored
    assert picked(a1, b, hinted("10.244.3.1")) == everyone
    # no endpoint for this zone: the whole cluster
    assert picked(b, hinted("10.244.2.2", ("zone-b",))) == ["10.244.2.1:8080", "10.244.2.2:8080"]
    # a node without a zone label ignores zone hints
    assert picked(a1, b, node=Node("node-1")) == ["10.244.1.1:8080", "10.244.2.1:8080"]
    # node hints (PreferSameNode) win when every endpoint has one and one is for this node
    n1 = hinted("10.244.1.1", ("zone-a",), ("node-1",))
    n2 = hinted("10.244.1.2", ("zone-a",), ("node-2",))
    assert picked(n1, n2) == ["10.244.1.1:8080"]
    assert picked(hinted("10.244.1.1", ("zone-a",), ("node-3",)), n2) == [
        "10.244.1.1:8080",
        "10.244.1.2:8080",
    ]  # no node hint for this node: the zone's
    # hints never narrow a Local policy, nor the terminating fall-back
    term = {**b, "conditions": {"ready": False, "serving": True, "terminating": True}}
    assert picked(term) == ["10.244.2.1:8080"]


def test_the_nodes_zone_comes_from_its_label() -> None:
    n = node("node-1", "192.168.0.10")
    assert node_zone(n) == "" and node_zone(None) == ""
    n["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-a"
    assert node_zone(n) == "zone-a"


def test_node_ports_open_only_on_node_addresses_of_the_services_families() -> None:
    """An IPv4-only Service's node port is not opened on the node's IPv6 address, where it
    could only reset connections (no IPv6 endpoints): each family on its own."""
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}]
    dual = Node("node-1", (ipaddress.ip_address("192.168.0.10"), ipaddress.ip_address("fd00::10")))
    out = translate(
        [web(type="NodePort", ports=ports)], [web_slice(endpoint("10.244.1.5"))], dual
    ).services
    assert sorted(str(s.listen) for s in out) == ["10.96.0.10:80", "192.168.0.10:30080"]


def test_load_balancer_source_ranges_restrict_the_ingress_addresses_only() -> None:
    """kube-proxy's semantics: the ranges apply to the load-balancer ingress IPs; the
    cluster IP, external IPs and node ports stay open."""
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080}]
    svc = web(type="LoadBalancer", ports=ports)
    svc["spec"] |= {
        "externalIPs": ["203.0.113.9"],
        "loadBalancerSourceRanges": [" 198.51.100.0/24", "2001:db8::/32", "10.1.2.3/8", "x"],
    }
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}
    t = translate([svc], [web_slice(endpoint("10.244.1.5"))], NODE)
    by_listen = {str(s.listen): s.allowed_sources for s in t.services}
    allowed = tuple(map(ipaddress.ip_network, ["198.51.100.0/24", "2001:db8::/32", "10.0.0.0/8"]))
    assert by_listen == {
        "10.96.0.10:80": (),
        "203.0.113.9:80": (),
        "203.0.113.7:80": allowed,
        "192.168.0.10:30080": (),
    }
    assert "default/web: loadBalancerSourceRanges entry 'x' is not a CIDR" in t.skipped


# --- a sync told which Services changed (translate_changed) ------------------------------

Op = tuple[str, int, int, int]  # (what, which, a choice, another)


def _edge(i: int, vip: int, local: bool) -> dict[str, Any]:
    """Service s{i} on one of a few cluster IPs (two may clash); a LoadBalancer with
    externalTrafficPolicy: Local (a health check) when `local`."""
    svc = service(
        f"s{i}", cluster_ip=f"10.96.0.{vip}", type="LoadBalancer" if local else "ClusterIP"
    )
    if local:
        svc["spec"] |= {"externalTrafficPolicy": "Local", "healthCheckNodePort": 32000 + i}
        svc["spec"]["ports"][0]["nodePort"] = 30000 + i
    return svc


def _slice(j: int, owner: int, endpoints: int) -> dict[str, Any]:
    eps = [
        endpoint(f"10.244.{j}.{e}", node_name="node-1" if e % 2 else "node-2")
        for e in range(endpoints)
    ]
    return endpoint_slice(f"slice-{j}", f"s{owner}", endpoints=eps)


@given(
    st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(["service", "delete service", "slice", "delete slice"]),
                st.integers(0, 5),
                st.integers(0, 3),
                st.integers(0, 3),
            ),
            max_size=6,
        ),
        max_size=8,
    )
)
@settings(max_examples=300, deadline=None)
def test_translating_the_changed_services_only_gives_what_translating_all_does(
    syncs: list[list[Op]],
) -> None:
    services: dict[tuple[str, str], dict[str, Any]] = {}
    slices: dict[tuple[str, str], dict[str, Any]] = {}
    memo = Memo()
    before = translate([], [], NODE, memo=memo)
    for ops in syncs:
        changed: set[tuple[str, str]] = set()
        for what, which, a, b in ops:
            if what.endswith("service"):
                key = ("default", f"s{which}")
                changed.add(key)
                if what == "service":
                    services[key] = _edge(which, 10 + a, local=b == 0)
                else:
                    services.pop(key, None)
            else:
                key = ("default", f"slice-{which}")
                old = slices.pop(key, None)
                if old is not None:
                    changed.add(("default", old["metadata"]["labels"][SERVICE_NAME_LABEL]))
                if what == "slice":
                    slices[key] = _slice(which, a, b)
                    changed.add(("default", f"s{a}"))
        of = {
            k: (services.get(k), [s for s in slices.values() if slice_owner(s) == k])
            for k in changed
        }
        after = translate_changed(memo, of, NODE)
        every = translate(services.values(), slices.values(), NODE)
        assert after.services == every.services
        assert after.skipped == every.skipped
        assert after.health_checks == every.health_checks
        # the services of the Services not named are the very objects of last time
        was = {s.key: s for s in before.services}
        for s in after.services:
            source = after.sources[s.key]
            if source not in changed and before.sources.get(s.key) == source:
                assert s is was[s.key]
        before = after


def test_an_endpoint_change_puts_the_new_service_in_place() -> None:
    memo = Memo()
    svcs = [_edge(i, 10 + i, local=False) for i in range(3)]
    first = translate(svcs, [_slice(i, i, 2) for i in range(3)], NODE, memo=memo)
    moved = _slice(1, 1, 3)
    after = translate_changed(memo, {("default", "s1"): (svcs[1], [moved])}, NODE)
    assert [s.name for s in after.services] == [s.name for s in first.services]
    assert after.services[0] is first.services[0] and after.services[2] is first.services[2]
    assert len(after.services[1].backends) == 3
    assert memo.current(NODE, SchedulerName.RR)
    assert not memo.current(Node("node-2"), SchedulerName.RR)
