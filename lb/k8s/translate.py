"""Kubernetes Services and EndpointSlices -> lb services, with kube-proxy's semantics.

Pure: it reads the objects as the API serves them (JSON dicts, as `kubectl get -o json`
shows them) and returns lb `Service` values plus a note for each thing it had to skip.

- One lb service per Service port and per address it is reached on: each cluster IP
  (`spec.clusterIPs`, both families), each `spec.externalIPs` entry, each load-balancer
  ingress IP, and, for NodePort and LoadBalancer Services, each node address at the node
  port. Named `namespace/name:port` (kube-proxy's service port name), with a suffix for
  the addresses that are not the first cluster IP.
- Headless (`clusterIP: None`) and ExternalName Services are not proxied; neither are
  Services labelled `service.kubernetes.io/service-proxy-name` (another proxy's).
- Backends come from the EndpointSlices labelled `kubernetes.io/service-name` with the
  Service's name, in its namespace, of the address's family: the slice port with the
  Service port's name carries the target port, already resolved from a named
  `targetPort` by the EndpointSlice controller. Ready endpoints serve; when none is
  ready, serving-and-terminating ones do; unready ones never.
- `internalTrafficPolicy: Local` keeps the cluster IP's endpoints to this node's;
  `externalTrafficPolicy: Local` does the same for node ports, external and
  load-balancer IPs.
- Topology, as kube-proxy: the EndpointSlice controller writes hints (for
  `trafficDistribution` and topology-aware routing); the Cluster-policy endpoints are
  those hinted for this node (every ready endpoint with node hints, one for this node),
  else for this node's zone (`topology.kubernetes.io/zone` label; every ready endpoint
  with zone hints, one for the zone), else all of them.
- `sessionAffinity: ClientIP` -> persistence per client address (/32, /128), for
  `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800 s).
- The scheduler is the annotation `lb.io/scheduler` (rr, wrr, lc, ... as ipvsadm
  names them), else the configured default (rr, as kube-proxy's IPVS mode).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lb.model import (
    TCP_IDLE_TIMEOUT,
    UDP_IDLE_TIMEOUT,
    UDP_MAX_FLOWS,
    Backend,
    Endpoint,
    IPAddress,
    IPNetwork,
    Persistence,
    Protocol,
    SchedulerName,
    Service,
    ServiceKey,
)

SCHEDULER_ANNOTATION = "lb.io/scheduler"
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, the API's default for ClientIP affinity

Object = Mapping[str, Any]
ObjectKey = tuple[str, str]  # namespace, name


def object_key(obj: Object) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


@dataclass(frozen=True, slots=True)
class Node:
    """This node: its name (for endpoints' `nodeName`) and the addresses node ports
    listen on."""

    name: str
    addresses: tuple[IPAddress, ...] = ()
    zone: str = ""  # its topology.kubernetes.io/zone label: for zone hints


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """A Service's health-check node port (`externalTrafficPolicy: Local`) and how many
    ready endpoints it has on this node (lb/k8s/health.py answers on it)."""

    service: ObjectKey
    port: int
    local_endpoints: int


@dataclass(frozen=True, slots=True)
class Translation:
    services: tuple[Service, ...]
    skipped: tuple[str, ...] = ()  # one line per object or port not proxied, and why
    sources: dict[ServiceKey, ObjectKey] = field(default_factory=dict, compare=False)
    health_checks: tuple[HealthCheck, ...] = ()


def node_zone(node: Object | None) -> str:
    """A Node's zone (its topology.kubernetes.io/zone label), or ""."""
    labels = ((node or {}).get("metadata") or {}).get("labels") or {}
    return str(labels.get(ZONE_LABEL) or "")


def node_addresses(node: Object | None) -> tuple[IPAddress, ...]:
    """A Node's InternalIP and ExternalIP addresses, in its order."""
    if node is None:
        return ()
    out: list[IPAddress] = []
    for a in (node.get("status") or {}).get("addresses") or []:
        if a.get("type") in ("InternalIP", "ExternalIP"):
            ip = _ip(a.get("address"))
            if ip is not None and ip not in out:
                out.append(ip)
    return tuple(out)


def slice_owner(obj: Object) -> ObjectKey | None:
    """The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label, in
    its namespace), or None."""
    meta = obj.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    return (str(meta.get("namespace") or ""), str(owner)) if owner else None


@dataclass(slots=True)
class _Made:
    """What one Service and its slices gave, and from which objects."""

    service: Object
    slices: tuple[Object, ...]  # in the order of their keys
    node: Node
    scheduler: SchedulerName
    services: list[Service]
    skipped: list[str]
    check: HealthCheck | None

    def same_shape(self, other: _Made) -> bool:
        """The same lb services (by protocol and address), notes and health check: the
        other can take this one's place in a translation without changing any other."""
        return (
            self.skipped == other.skipped
            and self.check == other.check
            and [s.key for s in self.services] == [s.key for s in other.services]
        )


class Memo:
    """The last translation of each Service: one whose object and slices are the very
    objects of last time (the informers keep an unchanged object as it was) gives the
    same lb services again, not new equal ones. A sync then costs the Services that
    changed: the controller recognises the others by identity and hands the
    dataplanes only the changed ones (lb/changes.py).

    It also keeps the last Translation, for `translate_changed`: a sync told which
    Services changed visits only those, not every Service."""

    def __init__(self) -> None:
        self.made: dict[ObjectKey, _Made] = {}  # in the order of the keys
        self.last: Translation | None = None
        self.node: Node | None = None
        self.scheduler: SchedulerName | None = None
        #: where each lb service of `last` sits in its `services`
        self.index: dict[ServiceKey, int] = {}

    def current(self, node: Node, default_scheduler: SchedulerName) -> bool:
        """Whether `translate_changed` can start from the last translation: there is one,
        made for this node and default scheduler."""
        return self.last is not None and (self.node, self.scheduler) == (node, default_scheduler)


def translate(
    services: Iterable[Object],
    slices: Iterable[Object],
    node: Node,
    default_scheduler: SchedulerName = SchedulerName.RR,
    memo: Memo | None = None,
) -> Translation:
    """Every Service with its EndpointSlices (those of a Service whose object and slices
    are the very ones `memo` made last time are not translated again)."""
    by_service: dict[ObjectKey, list[Object]] = {}
    for s in slices:
        owner = slice_owner(s)
        if owner is not None:
            by_service.setdefault(owner, []).append(s)
    previous = memo.made if memo is not None else {}
    made: dict[ObjectKey, _Made] = {}
    for svc in sorted(services, key=object_key):
        key = object_key(svc)
        own = tuple(sorted(by_service.get(key, ()), key=object_key))
        made[key] = _make(svc, own, node, default_scheduler, previous.get(key))
    translation, index = _assemble(made)
    if memo is not None:
        memo.made, memo.last, memo.index = made, translation, index
        memo.node, memo.scheduler = node, default_scheduler
    return translation


def translate_changed(
    memo: Memo,
    changed: Mapping[ObjectKey, tuple[Object | None, Iterable[Object]]],
    node: Node,
    default_scheduler: SchedulerName = SchedulerName.RR,
) -> Translation:
    """The memo's last translation with the Services of `changed` translated again, each
    from its object (None: deleted) and its EndpointSlices: what `translate` of every
    Service would give, for the work of the changed ones. An endpoint change (the same
    lb services, notes and health check) puts its services in place of the old ones;
    a Service added or removed, or one whose lb services, notes or check change, assembles
    the translation again from the memo (a pass over every Service's services, none
    translated again). The memo must be `current` for the node and scheduler."""
    last = memo.last
    assert last is not None and memo.current(node, default_scheduler)
    made = memo.made
    reassemble = False
    placed: list[tuple[_Made, _Made]] = []
    for key, (svc, slices) in changed.items():
        old = made.get(key)
        if svc is None:
            if old is not None:
                del made[key]
                reassemble = True
            continue
        own = tuple(sorted(slices, key=object_key))
        m = _make(svc, own, node, default_scheduler, old)
        if m is old:
            continue
        made[key] = m  # an existing key keeps its place in the order
        if old is None:
            reassemble = True
        elif not reassemble:
            placed.append((old, m))
    services = list(last.services)
    index = memo.index
    for old, m in placed if not reassemble else ():
        at = [index.get(s.key) for s in old.services]
        if not m.same_shape(old) or any(
            i is None or services[i] is not s for i, s in zip(at, old.services, strict=True)
        ):
            reassemble = True  # (an old service that lost its address to another Service)
            break
        for i, s in zip(at, m.services, strict=True):
            assert i is not None
            services[i] = s
    if reassemble:
        memo.made = dict(sorted(made.items()))
        memo.last, memo.index = _assemble(memo.made)
    else:
        memo.last = Translation(tuple(services), last.skipped, last.sources, last.health_checks)
    return memo.last


def _make(
    svc: Object,
    own: tuple[Object, ...],
    node: Node,
    default_scheduler: SchedulerName,
    m: _Made | None,
) -> _Made:
    """The Service's translation: `m` itself if made from these very objects."""
    if (
        m is None
        or m.service is not svc
        or m.node != node
        or m.scheduler != default_scheduler
        or len(m.slices) != len(own)
        or any(a is not b for a, b in zip(m.slices, own, strict=True))
    ):
        notes: list[str] = []
        one = _translate_one(svc, list(own), node, default_scheduler, notes)
        m = _Made(svc, own, node, default_scheduler, one, notes, _health_check(svc, own, node))
    return m


def _assemble(made: Mapping[ObjectKey, _Made]) -> tuple[Translation, dict[ServiceKey, int]]:
    """The translation of the Services `made` holds, in its order (the first Service in
    it keeps an address two ask for), and where each lb service sits in it."""
    out: list[Service] = []
    skipped: list[str] = []
    sources: dict[ServiceKey, ObjectKey] = {}
    checks: list[HealthCheck] = []
    index: dict[ServiceKey, int] = {}
    for key, m in made.items():
        skipped += m.skipped
        if m.check is not None:
            checks.append(m.check)
        for lb_service in m.services:
            other = sources.get(lb_service.key)
            if other is not None:
                skipped.append(
                    f"{lb_service.name}: {lb_service.protocol} {lb_service.listen} is already "
                    f"used by {other[0]}/{other[1]}"
                )
                continue
            sources[lb_service.key] = key
            index[lb_service.key] = len(out)
            out.append(lb_service)
    return Translation(tuple(out), tuple(skipped), sources, tuple(checks)), index


def _health_check(svc: Object, slices: Iterable[Object], node: Node) -> HealthCheck | None:
    """kube-proxy's: a Service with `externalTrafficPolicy: Local` and a
    `healthCheckNodePort` (the API sets one for LoadBalancer Services) has one; it
    counts this node's ready endpoints, by address, over the Service's slices."""
    spec = svc.get("spec") or {}
    port = spec.get("healthCheckNodePort")
    if spec.get("externalTrafficPolicy") != "Local" or not isinstance(port, int):
        return None
    if not 1 <= port <= 65535 or spec.get("type") not in ("NodePort", "LoadBalancer"):
        return None
    local = {
        address
        for s in slices
        for e in s.get("endpoints") or []
        if e.get("nodeName") == node.name and (e.get("conditions") or {}).get("ready") is not False
        for address in (e.get("addresses") or [])[:1]
    }
    return HealthCheck(object_key(svc), port, len(local))


def _translate_one(
    svc: Object,
    slices: list[Object],
    node: Node,
    default_scheduler: SchedulerName,
    skipped: list[str],
) -> list[Service]:
    ns, name = object_key(svc)
    meta = svc.get("metadata") or {}
    spec = svc.get("spec") or {}
    if PROXY_NAME_LABEL in (meta.get("labels") or {}):
        return []  # another proxy's: kube-proxy's rule
    kind = spec.get("type") or "ClusterIP"
    if kind == "ExternalName":
        return []
    cluster_ips = [ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip]
    if not cluster_ips or cluster_ips[0] == "None":
        return []  # headless: DNS only
    scheduler = default_scheduler
    wanted = (meta.get("annotations") or {}).get(SCHEDULER_ANNOTATION)
    if wanted is not None:
        try:
            scheduler = SchedulerName(str(wanted).strip().lower())
        except ValueError:
            skipped.append(
                f"{ns}/{name}: annotation {SCHEDULER_ANNOTATION}={wanted!r} is not a scheduler "
                f"({', '.join(s.value for s in SchedulerName)}); using {default_scheduler}"
            )
    persistence_timeout: int | None = None
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
        timeout = cfg.get("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
        persistence_timeout = (
            timeout if isinstance(timeout, int) and timeout > 0 else DEFAULT_AFFINITY_TIMEOUT
        )
    internal_local = spec.get("internalTrafficPolicy") == "Local"
    external_local = spec.get("externalTrafficPolicy") == "Local"
    # the Service's address families: its cluster IPs' (spec.ipFamilies says the same)
    families = {ip.version for ip in map(_ip, cluster_ips) if ip is not None}
    # external IPs are open to all; load-balancer ingress IPs to loadBalancerSourceRanges
    ranges = _source_ranges(spec, f"{ns}/{name}", skipped)
    external_ips: list[tuple[object, tuple[IPNetwork, ...]]]
    external_ips = [(text, ()) for text in spec.get("externalIPs") or []]
    external_ips += [
        (i["ip"], ranges)
        for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        if i.get("ip")
    ]
    out: list[Service] = []
    for port in spec.get("ports") or []:
        base = f"{ns}/{name}:{port.get('name') or port.get('port')}"
        protocol_name = str(port.get("protocol") or "TCP").lower()
        if protocol_name not in ("tcp", "udp"):
            skipped.append(f"{base}: protocol {port.get('protocol')} is not proxied (tcp, udp)")
            continue
        protocol = Protocol(protocol_name)
        number = port.get("port")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            skipped.append(f"{base}: port {number!r} is not a port number")
            continue
        # suffix, address, port, local only, allowed sources
        vips: list[tuple[str, IPAddress, int, bool, tuple[IPNetwork, ...]]] = []
        for i, text in enumerate(cluster_ips):
            ip = _ip(text)
            if ip is None:
                skipped.append(f"{base}: cluster IP {text!r} is not an IP address")
                continue
            vips.append(("" if i == 0 else f"@{ip}", ip, number, internal_local, ()))
        for text, sources in external_ips:
            ip = _ip(text)
            if ip is None:
                skipped.append(f"{base}: external IP {text!r} is not an IP address")
                continue
            vips.append((f"@{ip}", ip, number, external_local, sources))
        node_port = port.get("nodePort")
        if kind in ("NodePort", "LoadBalancer") and isinstance(node_port, int) and node_port:
            vips += [
                (f"@{ip}:{node_port}", ip, node_port, external_local, ())
                for ip in node.addresses
                if ip.version in families  # each family on its own, as kube-proxy
            ]
        for suffix, ip, listen_port, local_only, sources in vips:
            backends = _backends(
                slices,
                port_name=port.get("name") or "",
                protocol=protocol,
                family=ip.version,
                node=node,
                local_only=local_only,
            )
            udp = protocol is Protocol.UDP
            out.append(
                Service(
                    name=base + suffix,
                    protocol=protocol,
                    listen=Endpoint(ip, listen_port),
                    scheduler=scheduler,
                    persistence=None
                    if persistence_timeout is None
                    else Persistence(persistence_timeout, 32 if ip.version == 4 else 128),
                    backends=backends,
                    idle_timeout=UDP_IDLE_TIMEOUT if udp else TCP_IDLE_TIMEOUT,
                    # no connect retry: kube-proxy's dataplanes have none, and a service
                    # with one could not go to the kernel (retries are userspace-only)
                    retries=0,
                    max_connections=UDP_MAX_FLOWS if udp else 0,
                    allowed_sources=sources,
                )
            )
    return out


def _source_ranges(spec: Object, name: str, skipped: list[str]) -> tuple[IPNetwork, ...]:
    """`loadBalancerSourceRanges`, read as kube-proxy reads them (spaces trimmed, host bits
    allowed). Every range of either family is kept: a range list with none of a VIP's
    family lets no client of that family in, as in kube-proxy."""
    out: list[IPNetwork] = []
    for text in spec.get("loadBalancerSourceRanges") or []:
        try:
            out.append(ipaddress.ip_network(str(text).strip(), strict=False))
        except ValueError:
            skipped.append(f"{name}: loadBalancerSourceRanges entry {text!r} is not a CIDR")
    return tuple(out)


def _backends(
    slices: list[Object],
    *,
    port_name: str,
    protocol: Protocol,
    family: int,
    node: Node,
    local_only: bool,
) -> tuple[Backend, ...]:
    """Ready endpoints; if there is none, the serving-and-terminating ones. Without
    `local_only`, topology hints narrow the ready ones as kube-proxy's do (`_topology`)."""
    ready: list[Endpoint] = []
    terminating: list[Endpoint] = []
    hints: list[tuple[Endpoint, set[str], set[str]]] = []  # ready: (zones, nodes) hinted
    address_type = "IPv4" if family == 4 else "IPv6"
    for s in sorted(slices, key=object_key):
        if s.get("addressType", "IPv4") != address_type:
            continue
        target = next(
            (
                p.get("port")
                for p in s.get("ports") or []
                if (p.get("name") or "") == port_name
                and str(p.get("protocol") or "TCP").lower() == protocol.value
            ),
            None,
        )
        if not isinstance(target, int) or not 1 <= target <= 65535:
            continue
        for e in s.get("endpoints") or []:
            if local_only and e.get("nodeName") != node.name:
                continue
            cond = e.get("conditions") or {}
            is_ready = cond.get("ready") is not False  # unset means ready (the API's rule)
            serving = cond.get("serving", cond.get("ready")) is not False
            is_terminating = cond.get("terminating") is True
            for text in (e.get("addresses") or [])[:1]:  # the API: one address is used
                ip = _ip(text)
                if ip is None or ip.version != family:
                    continue
                if is_ready and not is_terminating:
                    ready.append(Endpoint(ip, target))
                    if not local_only:
                        hints.append((ready[-1], *_hinted(e)))
                elif serving and is_terminating:
                    terminating.append(Endpoint(ip, target))
    if hints:
        ready = _topology(hints, node)
    chosen = ready or terminating
    return tuple(Backend(e) for e in dict.fromkeys(chosen))


def _hinted(endpoint: Object) -> tuple[set[str], set[str]]:
    """The zones and the nodes an endpoint's hints are for."""
    h = endpoint.get("hints") or {}
    return (
        {str(z.get("name")) for z in h.get("forZones") or [] if isinstance(z, dict)},
        {str(n.get("name")) for n in h.get("forNodes") or [] if isinstance(n, dict)},
    )


def _topology(ready: list[tuple[Endpoint, set[str], set[str]]], node: Node) -> list[Endpoint]:
    """kube-proxy's topology (pkg/proxy/topology.go): the ready endpoints hinted for this
    node if every ready one has node hints and one is for this node (PreferSameNode);
    else those hinted for this node's zone if every one has zone hints and one is for the
    zone (PreferSameZone, `trafficDistribution: PreferClose` and topology-aware routing);
    else all of them: missing hints, or hints that would leave this node or zone without
    an endpoint, fall back to the whole cluster."""
    if all(nodes for _, _, nodes in ready) and any(node.name in n for _, _, n in ready):
        return [e for e, _, nodes in ready if node.name in nodes]
    if node.zone and all(zones for _, zones, _ in ready):
        mine = [e for e, zones, _ in ready if node.zone in zones]
        if mine:
            return mine
    return [e for e, _, _ in ready]


def _ip(text: object) -> IPAddress | None:
    try:
        return ipaddress.ip_address(str(text))
    except ValueError:
        return None
