"""How services look in nftables, and the transaction that moves the kernel from one set
of services to another: pure code, no I/O (offload/nftables.py runs it).

Table `ip lb` holds what all services share: `masq_paths` (masquerade for hairpin: a
backend reaching itself through the VIP), and the per-backend connection counters with
the map `conns` that finds a new connection's counter from its original VIP:port and
its backend, counted once per connection in the postrouting (or input) nat hook. It also
holds the filter of the services with `allowed_sources` (as kube-proxy's nftables mode
filters `loadBalancerSourceRanges`): the map `firewall` from (VIP, protocol, port) to
the service's chain `fw_<id>`, looked up for new connections in filter chains that run
before DNAT, which drops a client outside the interval set `src_<id>` (IPVS's host
table, offload/host.py, has the same objects). The services live in `SHARDS` tables
`ip lb_0` ... (a service's table chosen by a hash of its key), each with:
- a verdict map `services` from (VIP, protocol, port) to the service's chain, looked up
  once per new connection from the nat hooks (constant time, as kube-proxy's nftables
  proxier does);
- per service a chain `svc_<id>` that picks a backend, with `numgen inc` (rr, wrr) or
  `jhash` (sh) over the scheduler's slots: one rule that DNATs through a map of slot ->
  backend address . port;
- with persistence, a persistence check per backend first (`ip saddr & mask @aff_...`),
  and per backend a chain `ep_<id>_<n>` that renews the client's affinity and DNATs.

Each service's objects are rendered on their own, so a change to one service rewrites only
that service's objects: the transaction's size does not grow with the number of services.
Why so few chains: at every commit the kernel walks every chain of the network namespace
(nf_tables_commit, "make rules_gen_X visible"), whatever the transaction touched, so the
cost of any change grows with the chains there are; a chain per backend (kube-proxy's
shape) would multiply it by the backends. Why shards: at a commit that adds a jump, the
kernel re-validates the whole table it touches, and it finds sets by walking the table's
list of them; sixteen tables cut both sixteenfold, for sixteen map lookups per new
connection.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import reduce
from ipaddress import IPv4Network

from lb.model import (
    Endpoint,
    IPAddress,
    IPNetwork,
    Protocol,
    SchedFlag,
    SchedulerName,
    Service,
    ServiceKey,
)
from lb.persist import Affinity
from lb.sched import SCHEDULERS
from lb.virtual_service import VirtualService

TABLE = "lb"  # hairpin masquerade, counters, the filter of allowed_sources
SHARDS = 16
TABLES = (TABLE, *(f"{TABLE}_{i}" for i in range(SHARDS)))


def shard_of(key: ServiceKey) -> str:
    """The table of a service's objects: stable across runs (crc32 of its name)."""
    return f"{TABLE}_{zlib.crc32(service_id(key).encode()) % SHARDS}"


#: Longest cycle a `numgen` map may hold: wrr weights whose cycle is longer stay in
#: userspace (the map is rebuilt whole on every change to the service).
MAX_CYCLE = 4096
AFFINITY_SIZE = 65535
FIREWALL = "firewall"  # the map of filtered services, in table lb (and IPVS's lb_ipvs)
#: The filter chains' priority: before DNAT (kube-proxy's is dstnat - 10 too).
FILTER_PRIORITY = -110


def not_expressible_nft(s: Service) -> str | None:
    """Why nftables NAT cannot carry `s` (beyond what no kernel path can), or None."""
    if not SCHEDULERS[s.scheduler].nftables:
        names = [str(spec.name) for spec in SCHEDULERS.values() if spec.nftables]
        return (
            f"scheduler {s.scheduler} is not expressible in nftables "
            f"({', '.join(names[:-1])} and {names[-1]} are); "
            "it needs connection counts or IPVS's hash tables"
        )
    if SchedFlag.FALLBACK in s.flags:
        return "sh-fallback needs IPVS (nftables cannot skip an unavailable bucket)"
    for b in s.backends:
        if b.max_connections or b.resume_below:
            return f"backend {b.address}: connection thresholds need IPVS or userspace"
    if cycle_length(s) > MAX_CYCLE:
        return f"the wrr cycle of these weights is longer than {MAX_CYCLE} picks"
    return None


def service_id(key: ServiceKey) -> str:
    """A stable name for the service's objects: `tcp_10_0_0_1_80`."""
    return f"{key.protocol.value}_{str(key.listen.ip).replace('.', '_')}_{key.listen.port}"


def available(s: Service) -> list[Endpoint]:
    """The backends that take new connections, in the kernel's list order (newest first)."""
    return [b.address for b in reversed(s.backends) if b.effective_weight > 0]


def cycle_length(s: Service) -> int:
    """rr: the number of available backends; wrr: the sum of their weights over their
    greatest common divisor."""
    return _length(s.scheduler, tuple(b.effective_weight for b in s.backends))


def _length(scheduler: SchedulerName, weights: tuple[int, ...]) -> int:
    live = [w for w in weights if w > 0]
    if scheduler is not SchedulerName.WRR or not live:
        return len(live)
    g = reduce(math.gcd, live)
    return sum(w // g for w in live)


def cycle(s: Service) -> list[Endpoint]:
    """One period of the picks the kernel's scheduler makes on a fresh service with these
    backends (rr goes down the list, wrr interleaves by weight), computed by the userspace
    reference itself (once per scheduler and list of weights)."""
    live = [b for b in s.backends if b.effective_weight > 0]
    order = _cycle(s.scheduler, tuple(b.effective_weight for b in live))
    return [live[i].address for i in order]


@functools.lru_cache(maxsize=1024)
def _cycle(scheduler: SchedulerName, weights: tuple[int, ...]) -> tuple[int, ...]:
    """The cycle as indexes into the backends: it depends on their order and weights only."""
    vs = VirtualService(Protocol.TCP, Endpoint(ipaddress.ip_address("0.0.0.1"), 1), scheduler)
    endpoints = [Endpoint(ipaddress.ip_address(i + 1), 1) for i in range(len(weights))]
    for e, w in zip(endpoints, weights, strict=True):
        vs.add_dest(e, w)
    index = {e: i for i, e in enumerate(endpoints)}
    picks = []
    for _ in range(_length(scheduler, weights)):
        conn = vs.connect(b"\0\0\0\0", 0, 0.0)
        assert conn is not None
        vs.release(conn, 0.0)
        picks.append(index[conn.dest.endpoint])
    return tuple(picks)


@dataclass(frozen=True, slots=True)
class NatPath:
    """Packets from `source` to `backend` (after the kernel's DNAT) that need masquerade."""

    source: IPAddress
    protocol: Protocol
    backend: Endpoint

    def sort_key(self) -> tuple[int, int, str, int]:
        return (int(self.source), int(self.backend.ip), self.protocol.value, self.backend.port)


class PathCounts:
    """How many services need each masquerade path: a path is in the kernel's set while
    one does. `add` and `remove` note in `edges` the paths that enter or leave it."""

    def __init__(self) -> None:
        self._count: Counter[NatPath] = Counter()

    def __iter__(self) -> Iterator[NatPath]:
        return iter(self._count)

    def add(self, paths: Iterable[NatPath], edges: set[NatPath]) -> None:
        for p in paths:
            if not self._count[p]:
                edges.add(p)
            self._count[p] += 1

    def remove(self, paths: Iterable[NatPath], edges: set[NatPath]) -> None:
        for p in paths:
            self._count[p] -= 1
            if self._count[p] <= 0:
                del self._count[p]
                edges.add(p)

    def clear(self) -> None:
        self._count.clear()


def fields(ip: IPAddress, protocol: Protocol, port: int) -> str:
    """Address . protocol . port, the concatenation every lb set and map key ends with."""
    return f"{ip} . {protocol.value} . {port}"


def key_fields(key: ServiceKey) -> str:
    return fields(key.listen.ip, key.protocol, key.listen.port)


def masq_elements(paths: Iterable[NatPath]) -> str:
    """The elements of a `masq_paths` set (source . backend ip . protocol . port)."""
    return ", ".join(
        f"{p.source} . {fields(p.backend.ip, p.protocol, p.backend.port)}"
        for p in sorted(paths, key=NatPath.sort_key)
    )


def key_element(key: ServiceKey) -> str:
    """A service key as a set element: `{ VIP . protocol . port }`."""
    return f"{{ {key_fields(key)} }}"


@dataclass(frozen=True, slots=True)
class Names:
    """The names of one backend's objects within its service."""

    chain: str  # ep_<service>_<backend> (persistence): renews affinity, DNATs
    counter: str  # c_<service>_<backend>
    affinity: str  # aff_<service>_<backend>: clients that stick to it

    @classmethod
    def of(cls, key: ServiceKey, e: Endpoint) -> Names:
        tail = f"{service_id(key)}_{str(e.ip).replace('.', '_')}_{e.port}"
        return cls(f"ep_{tail}", f"c_{tail}", f"aff_{tail}")


# --- a service's objects -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointRule:
    """Renew the client's affinity (persistence), DNAT to the backend."""

    affinity: str  # the set to renew, with the client's prefix
    prefix_len: int
    protocol: Protocol
    backend: Endpoint

    def nft(self) -> str:
        return (
            f"update @{self.affinity} {{ ip saddr & {mask(self.prefix_len)} }} "
            f"meta l4proto {self.protocol.value} dnat to {self.backend.ip}:{self.backend.port}"
        )


@dataclass(frozen=True, slots=True)
class StickyRule:
    """A client (its prefix) in a backend's affinity set goes to that backend."""

    prefix_len: int
    affinity: str
    chain: str

    def nft(self) -> str:
        return f"ip saddr & {mask(self.prefix_len)} @{self.affinity} goto {self.chain}"


@dataclass(frozen=True, slots=True)
class DispatchRule:
    """Pick a backend chain: `numgen inc` over the scheduler's cycle (rr, wrr) or `jhash`
    of the client (sh, with its port for sh-port) over weighted slots."""

    hashed: bool
    with_port: bool
    chains: tuple[str, ...]  # slot i goes to chains[i]

    def nft(self) -> str:
        vmap = ", ".join(f"{i} : goto {c}" for i, c in enumerate(self.chains))
        return f"{_pick(self.hashed, self.with_port, len(self.chains))} vmap {{ {vmap} }}"


def _pick(hashed: bool, with_port: bool, slots: int) -> str:
    if hashed:
        key = "ip saddr . th sport" if with_port else "ip saddr"
        return f"jhash {key} mod {slots} seed 0x0"
    return f"numgen inc mod {slots}"


@dataclass(frozen=True, slots=True)
class DnatRule:
    """Pick a slot as DispatchRule does and DNAT to its backend, in one rule (a service
    without persistence needs no chain per backend)."""

    hashed: bool
    with_port: bool
    protocol: Protocol
    targets: tuple[Endpoint, ...]  # slot i goes to targets[i]

    def nft(self) -> str:
        slots = ", ".join(f"{i} : {e.ip} . {e.port}" for i, e in enumerate(self.targets))
        pick = _pick(self.hashed, self.with_port, len(self.targets))
        return f"meta l4proto {self.protocol.value} dnat ip to {pick} map {{ {slots} }}"


@dataclass(frozen=True, slots=True)
class SourceSet:
    """The clients a service takes (`allowed_sources`): an interval set of networks."""

    networks: tuple[IPv4Network, ...]  # merged, sorted (an interval set refuses overlaps)

    def nft(self) -> str:
        elements = ", ".join(_network(n) for n in self.networks)
        return "{ type ipv4_addr; flags interval; " + (
            f"elements = {{ {elements} }}; }}" if elements else "}"
        )


def _network(n: IPv4Network) -> str:
    return str(n.network_address) if n.prefixlen == 32 else str(n)


@dataclass(frozen=True, slots=True)
class SourceRule:
    """Drop a client outside the service's set (the filter chains see a connection's
    first packet only: `ct state new`)."""

    sources: str

    def nft(self) -> str:
        return f"ip saddr != @{self.sources} drop"


@dataclass(frozen=True, slots=True)
class Firewall:
    """A service's filter: `firewall` maps its key to `chain`, whose one rule drops the
    clients outside the set `sources`."""

    key: ServiceKey
    table: str
    chain: str  # fw_<service>
    sources: str  # src_<service>
    spec: SourceSet


def firewall_of(
    key: ServiceKey, allowed: Iterable[IPNetwork], table: str = TABLE
) -> Firewall | None:
    """The filter of a service with these `allowed_sources` (None: no filter, for no
    sources or an IPv6 VIP). Only IPv4 networks go into its set: an IPv6 one never
    matches an IPv4 client (the userspace proxy's `allows` agrees), so a list without any
    IPv4 network lets no client in."""
    allowed = tuple(allowed)
    if not allowed or key.listen.ip.version != 4:
        return None
    networks = ipaddress.collapse_addresses(n for n in allowed if isinstance(n, IPv4Network))
    sid = service_id(key)
    return Firewall(key, table, f"fw_{sid}", f"src_{sid}", SourceSet(tuple(networks)))


def firewall_base() -> list[str]:
    """The filter's map and chains, inside a table: new connections (`ct state new`: their
    first packet) to a filtered VIP:port, from outside (prerouting) or from this host
    (output), go to the service's chain, before any DNAT (nat's dstnat is -100; IPVS takes
    packets at LOCAL_IN, priority 98, and its host's clients' at LOCAL_OUT, -99)."""
    lookup = f"        ct state new ip daddr . meta l4proto . th dport vmap @{FIREWALL}"
    return [
        f"    map {FIREWALL} {{ type ipv4_addr . inet_proto . inet_service : verdict; }}",
        "    chain filter_prerouting {",
        f"        type filter hook prerouting priority {FILTER_PRIORITY}; policy accept;",
        lookup,
        "    }",
        "    chain filter_output {",
        f"        type filter hook output priority {FILTER_PRIORITY}; policy accept;",
        lookup,
        "    }",
    ]


Rule = EndpointRule | StickyRule | DispatchRule | DnatRule | SourceRule


@dataclass(frozen=True, slots=True)
class AffinitySet:
    """The clients (their prefixes) that stick to one backend, each for `timeout` s."""

    timeout: int

    def nft(self) -> str:
        return (
            f"{{ type ipv4_addr; size {AFFINITY_SIZE}; flags dynamic,timeout; "
            f"timeout {self.timeout}s; }}"
        )


@dataclass(frozen=True, slots=True, order=True)
class Conns:
    """A backend's connection counter (in table `lb`), and its element in `conns`."""

    key: ServiceKey
    backend: Endpoint
    counter: str

    def element(self) -> str:
        return f"{key_fields(self.key)} . {self.backend.ip} . {self.backend.port}"


@dataclass(frozen=True, slots=True)
class Rendered:
    """A service's objects, by kind and name."""

    key: ServiceKey
    table: str
    chain: str
    rules: tuple[StickyRule | DispatchRule | DnatRule, ...]  # the service chain's rules
    endpoints: dict[str, tuple[Names, EndpointRule]] = field(default_factory=dict)
    sets: dict[str, AffinitySet] = field(default_factory=dict)
    counters: frozenset[Conns] = frozenset()
    dispatch: bool = True  # in the services map (False: no backend, the listener answers)
    firewall: Firewall | None = None  # allowed_sources: in table lb, with the counters


def render(s: Service) -> Rendered:
    endpoints: dict[str, tuple[Names, EndpointRule]] = {}
    sets: dict[str, AffinitySet] = {}
    counters = set()
    for b in s.backends:
        n = Names.of(s.key, b.address)
        counters.add(Conns(s.key, b.address, n.counter))
        if s.persistence is not None:
            sets[n.affinity] = AffinitySet(s.persistence.timeout)
            rule = EndpointRule(n.affinity, s.persistence.prefix_len, s.protocol, b.address)
            endpoints[n.chain] = (n, rule)
    live = available(s)
    rules: list[StickyRule | DispatchRule | DnatRule] = []
    if s.persistence is not None:
        for e in live:
            n = Names.of(s.key, e)
            rules.append(StickyRule(s.persistence.prefix_len, n.affinity, n.chain))
    if live:
        rules.append(_dispatch(s, live))
    return Rendered(
        s.key,
        shard_of(s.key),
        f"svc_{service_id(s.key)}",
        tuple(rules),
        endpoints,
        sets,
        frozenset(counters),
        dispatch=bool(live),
        firewall=firewall_of(s.key, s.allowed_sources),
    )


def mask(prefix_len: int) -> str:
    value = (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF
    return ".".join(str((value >> shift) & 0xFF) for shift in (24, 16, 8, 0))


def _dispatch(s: Service, live: list[Endpoint]) -> DispatchRule | DnatRule:
    """The pick: slots of backends, to their chains (persistence) or straight to them."""
    hashed = s.scheduler is SchedulerName.SH
    if hashed:
        # One slot per unit of weight: each backend's share of clients is its weight's.
        weight = {b.address: b.effective_weight for b in s.backends}
        slots = [e for e in live for _ in range(weight[e])]
    else:
        slots = cycle(s)
    with_port = hashed and SchedFlag.PORT in s.flags
    if s.persistence is None:
        return DnatRule(hashed, with_port, s.protocol, tuple(slots))
    return DispatchRule(hashed, with_port, tuple(Names.of(s.key, e).chain for e in slots))


# --- transactions ----------------------------------------------------------------------------


#: A counter of every connection lb's `conns` counters count (the rule below counts it
#: once the map's counter is found): an idle lb reads this one object each refresh, and
#: dumps the per-backend counters only when it moved (a dump of 100,000 counters costs
#: the kernel about a second and a half).
TOTAL = "total"

#: Count a connection lb DNATed, once: the nat hooks see only its first packet, after
#: the DNAT (postrouting, or input for a backend on this host). Per protocol, for nft
#: to know the type of the original destination port.
COUNT = [
    f"        meta l4proto {p.value} counter name ct original ip daddr . meta l4proto . "
    f'ct original proto-dst . ip daddr . {p.value} dport map @conns counter name "{TOTAL}"'
    for p in Protocol
]


#: lb's flowtable, in table `ip lb` (`offload.flow_threshold`)
FLOWTABLE = "ft"


def devices_list(devices: Iterable[str]) -> str:
    return ", ".join(f'"{d}"' for d in sorted(devices))


@dataclass(frozen=True, slots=True)
class FastPath:
    """The flowtable: an established flow of a service lb DNATed (found in `conns` by its
    original VIP:port and its backend, so no other flow of the host) that has carried more
    than `threshold` packets, both directions counted (conntrack accounting), is added to
    it; from then on the flowtable's ingress hook on `devices` forwards its packets, NAT
    included, past the forwarding path (no more rules, no nat hooks: lb counts connections
    on a flow's first packet, so its counters stay right). Its `counter` flag keeps
    conntrack's packets and bytes counting the offloaded packets too. Only forwarded flows
    can be offloaded: not those of a client or a backend on the balancer itself."""

    threshold: int
    devices: frozenset[str] = frozenset()

    def flowtable(self) -> str:
        """The flowtable's declaration, inside table `ip lb`."""
        devices = f"devices = {{ {devices_list(self.devices)} }}; " if self.devices else ""
        return f"    flowtable {FLOWTABLE} {{ hook ingress priority filter; {devices}counter; }}"

    def rules(self) -> list[str]:
        """The forward chain's rules (per protocol, for nft to type the ports)."""
        return [
            f"        meta l4proto {p.value} ct packets > {self.threshold} "
            f"ct original ip daddr . meta l4proto . ct original proto-dst . "
            f"ct reply ip saddr . ct reply proto-src @conns flow add @{FLOWTABLE}"
            for p in Protocol
        ]


def base_script(hairpin: Iterable[NatPath] = (), fastpath: FastPath | None = None) -> list[str]:
    """The tables with their hooks, maps and masquerade set, empty of services (replacing
    any tables of those names, atomically, together with what follows in the
    transaction); table `ip lb` has the filter's map and chains (`firewall_base`), and
    with `fastpath` the flowtable and its forward chain."""
    elements = masq_elements(hairpin)
    out = [
        *_replace(TABLE),
        "    set masq_paths { type ipv4_addr . ipv4_addr . inet_proto . inet_service; "
        + (f"elements = {{ {elements} }}; " if elements else "")
        + "}",
        f"    counter {TOTAL} {{ }}",
        "    map conns { type ipv4_addr . inet_proto . inet_service . ipv4_addr . "
        "inet_service : counter; }",
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        *COUNT,
        "        ip saddr . ip daddr . meta l4proto . th dport @masq_paths masquerade",
        "    }",
        "    chain input {",
        "        type nat hook input priority 100; policy accept;",
        *COUNT,
        "    }",
        *firewall_base(),
    ]
    if fastpath is not None:
        out += [
            fastpath.flowtable(),
            "    chain forward {",
            "        type filter hook forward priority filter; policy accept;",
            *fastpath.rules(),
            "    }",
        ]
    out.append("}")
    for table in TABLES[1:]:
        out += [
            *_replace(table),
            "    map services { type ipv4_addr . inet_proto . inet_service : verdict; }",
            "    chain prerouting {",
            "        type nat hook prerouting priority dstnat; policy accept;",
            "        ip daddr . meta l4proto . th dport vmap @services",
            "    }",
            "    chain output {",
            "        type nat hook output priority -100; policy accept;",
            "        ip daddr . meta l4proto . th dport vmap @services",
            "    }",
            "}",
        ]
    return out


def _replace(table: str) -> list[str]:
    return [f"table ip {table}", f"delete table ip {table}", f"table ip {table} {{"]


def probe_flowtable_script() -> str:
    """A transaction that makes a flowtable and deletes it again, leaving nothing: the
    kernel refuses it ("No such file or directory") when it has no flowtables."""
    probe = f"{TABLE}_probe"
    return (
        f"table ip {probe} {{\n"
        f"    flowtable {FLOWTABLE} {{ hook ingress priority filter; }}\n"
        "}\n"
        f"delete table ip {probe}\n"
    )


@dataclass(frozen=True, slots=True)
class AddFlowtableDevices:
    """Devices that appeared since the flowtable was written (the kernel takes a device
    out of it by itself when the device goes)."""

    devices: frozenset[str]
    table: str = TABLE

    def nft(self) -> str:
        return (
            f"add flowtable ip {self.table} {FLOWTABLE} {{ hook ingress priority filter; "
            f"devices = {{ {devices_list(self.devices)} }}; }}"
        )


def remove_script() -> str:
    """Delete every table of lb's (those that exist: each is created first if missing)."""
    return "".join(f"table ip {t}\ndelete table ip {t}\n" for t in TABLES)


@dataclass(frozen=True, slots=True)
class AddChain:
    table: str
    name: str

    def nft(self) -> str:
        return f"add chain ip {self.table} {self.name}"


@dataclass(frozen=True, slots=True)
class FlushChain:
    table: str
    name: str

    def nft(self) -> str:
        return f"flush chain ip {self.table} {self.name}"


@dataclass(frozen=True, slots=True)
class DeleteChain:
    table: str
    name: str

    def nft(self) -> str:
        return f"delete chain ip {self.table} {self.name}"


@dataclass(frozen=True, slots=True)
class AddRule:
    table: str
    chain: str
    rule: Rule

    def nft(self) -> str:
        return f"add rule ip {self.table} {self.chain} {self.rule.nft()}"


@dataclass(frozen=True, slots=True)
class AddCounter:
    table: str
    name: str

    def nft(self) -> str:
        return f"add counter ip {self.table} {self.name}"


@dataclass(frozen=True, slots=True)
class DeleteCounter:
    table: str
    name: str

    def nft(self) -> str:
        return f"delete counter ip {self.table} {self.name}"


@dataclass(frozen=True, slots=True)
class AddConns:
    """The `conns` elements that find these counters."""

    counters: tuple[Conns, ...]
    table: str = TABLE

    def nft(self) -> str:
        elements = ", ".join(f'{c.element()} : "{c.counter}"' for c in self.counters)
        return f"add element ip {self.table} conns {{ {elements} }}"


@dataclass(frozen=True, slots=True)
class DeleteConns:
    counters: tuple[Conns, ...]
    table: str = TABLE

    def nft(self) -> str:
        elements = ", ".join(c.element() for c in self.counters)
        return f"delete element ip {self.table} conns {{ {elements} }}"


@dataclass(frozen=True, slots=True)
class AddSet:
    table: str
    name: str
    spec: AffinitySet | SourceSet

    def nft(self) -> str:
        return f"add set ip {self.table} {self.name} {self.spec.nft()}"


@dataclass(frozen=True, slots=True)
class DeleteSet:
    table: str
    name: str

    def nft(self) -> str:
        return f"delete set ip {self.table} {self.name}"


@dataclass(frozen=True, slots=True)
class AddAffinity:
    """Clients (their prefixes) put into a backend's affinity set for the time their
    template had left in the dataplane that carried the service before (a promote)."""

    table: str
    name: str
    clients: tuple[tuple[IPAddress, int], ...]  # (prefix address, milliseconds left)

    def nft(self) -> str:
        elements = ", ".join(f"{ip} timeout {ms}ms" for ip, ms in self.clients)
        return f"add element ip {self.table} {self.name} {{ {elements} }}"


def affinity_ops(r: Rendered, affinities: Iterable[Affinity]) -> list[AddAffinity]:
    """The elements that carry `affinities` into the service's sets (one op per backend
    set; a backend the service does not have in the kernel is left out)."""
    sets: dict[str, list[tuple[IPAddress, int]]] = {}
    names = {rule.backend: n.affinity for n, rule in r.endpoints.values()}
    for a in affinities:
        name = names.get(a.backend)
        ms = int(a.remaining * 1000)
        if name is not None and name in r.sets and ms > 0 and a.client.version == 4:
            sets.setdefault(name, []).append((a.client, ms))
    return [AddAffinity(r.table, name, tuple(sorted(c))) for name, c in sorted(sets.items())]


def with_affinity(ops: list[Op], seeds: list[AddAffinity]) -> list[Op]:
    """`seeds` inserted before the service's map element (the moment the kernel takes
    its new connections), after the sets they fill are made."""
    if not seeds:
        return ops
    at = next((i for i, op in enumerate(ops) if isinstance(op, AddService)), len(ops))
    return [*ops[:at], *seeds, *ops[at:]]


@dataclass(frozen=True, slots=True)
class AddService:
    """The services map's element for `key`: its packets go to `chain`."""

    table: str
    key: ServiceKey
    chain: str

    def nft(self) -> str:
        element = f"{key_fields(self.key)} : goto {self.chain}"
        return f"add element ip {self.table} services {{ {element} }}"


@dataclass(frozen=True, slots=True)
class DeleteService:
    table: str
    key: ServiceKey

    def nft(self) -> str:
        return f"delete element ip {self.table} services {key_element(self.key)}"


@dataclass(frozen=True, slots=True)
class AddFirewall:
    """The `firewall` map's element for `key`: its new connections go to `chain` first."""

    table: str
    key: ServiceKey
    chain: str

    def nft(self) -> str:
        element = f"{key_fields(self.key)} : goto {self.chain}"
        return f"add element ip {self.table} {FIREWALL} {{ {element} }}"


@dataclass(frozen=True, slots=True)
class DeleteFirewall:
    table: str
    key: ServiceKey

    def nft(self) -> str:
        return f"delete element ip {self.table} {FIREWALL} {key_element(self.key)}"


@dataclass(frozen=True, slots=True)
class AddMasq:
    paths: frozenset[NatPath]
    table: str = TABLE

    def nft(self) -> str:
        return f"add element ip {self.table} masq_paths {{ {masq_elements(self.paths)} }}"


@dataclass(frozen=True, slots=True)
class DeleteMasq:
    paths: frozenset[NatPath]
    table: str = TABLE

    def nft(self) -> str:
        return f"delete element ip {self.table} masq_paths {{ {masq_elements(self.paths)} }}"


Op = (
    AddChain
    | FlushChain
    | DeleteChain
    | AddRule
    | AddCounter
    | DeleteCounter
    | AddConns
    | DeleteConns
    | AddSet
    | DeleteSet
    | AddAffinity
    | AddService
    | DeleteService
    | AddFirewall
    | DeleteFirewall
    | AddMasq
    | DeleteMasq
)


def firewall_ops(old: Firewall | None, new: Firewall | None) -> list[Op]:
    """The operations that turn one service's filter from `old` into `new` (None: none):
    its own objects only. New sources replace the set whole (its chain's rule is flushed
    first, so that the set can go); the map element stays."""
    if old == new:
        return []
    out: list[Op] = []
    if old is not None:
        if new is None:
            out.append(DeleteFirewall(old.table, old.key))
        out += [FlushChain(old.table, old.chain), DeleteSet(old.table, old.sources)]
        if new is None:
            out.append(DeleteChain(old.table, old.chain))
            return out
    assert new is not None
    out.append(AddSet(new.table, new.sources, new.spec))
    if old is None:
        out.append(AddChain(new.table, new.chain))
    out.append(AddRule(new.table, new.chain, SourceRule(new.sources)))
    if old is None:
        out.append(AddFirewall(new.table, new.key, new.chain))
    return out


def diff_ops(old: Rendered | None, new: Rendered | None) -> list[Op]:
    """The operations that turn one service's objects from `old` into `new` (either may
    be None: a service added or removed). Empty when nothing changed. Order matters inside
    the transaction: references go before what they refer to is deleted, and objects exist
    before rules refer to them."""
    if old == new:
        return []
    t = new.table if new is not None else old.table if old is not None else TABLE
    # the filter, before the service's map element: the kernel never takes a connection
    # of the service without it
    out = firewall_ops(old.firewall if old else None, new.firewall if new else None)
    if old is not None and new is not None and replace(old, firewall=new.firewall) == new:
        return out  # only the filter changed: the service's chains stay as they are
    if old is not None and old.dispatch and (new is None or not new.dispatch):
        out.append(DeleteService(t, old.key))
    old_eps = old.endpoints if old else {}
    new_eps = new.endpoints if new else {}
    old_sets = old.sets if old else {}
    new_sets = new.sets if new else {}
    if old is not None:
        out.append(FlushChain(t, old.chain))  # drops its references to endpoints
    changed_sets = {n for n, d in new_sets.items() if old_sets.get(n) != d}
    # An endpoint chain is rewritten when its rule changed or the set it updates is
    # recreated or deleted (flushed first, so that the set can go).
    recreated = changed_sets | (old_sets.keys() - new_sets.keys())
    rewrite = {
        name
        for name, (names, _) in new_eps.items()
        if old_eps.get(name) != new_eps[name] or names.affinity in recreated
    }
    for name in old_eps:
        if name not in new_eps:
            out.append(DeleteChain(t, name))
        elif name in rewrite:
            out.append(FlushChain(t, name))
    out += [DeleteSet(t, name) for name in old_sets if name in recreated]
    old_counters = old.counters if old else frozenset()
    new_counters = new.counters if new else frozenset()
    gone = sorted(old_counters - new_counters)
    if gone:
        out.append(DeleteConns(tuple(gone)))
        out += [DeleteCounter(TABLE, c.counter) for c in gone]
    if new is None:
        assert old is not None
        out.append(DeleteChain(t, old.chain))
        return out
    fresh = sorted(new_counters - old_counters)
    if fresh:
        out += [AddCounter(TABLE, c.counter) for c in fresh]
        out.append(AddConns(tuple(fresh)))
    out += [AddSet(t, name, new_sets[name]) for name in sorted(changed_sets)]
    for name, (_, rule) in new_eps.items():
        if name in rewrite:
            out += [AddChain(t, name), AddRule(t, name, rule)]
    if old is None:
        out.append(AddChain(t, new.chain))
    out += [AddRule(t, new.chain, rule) for rule in new.rules]
    if new.dispatch and (old is None or not old.dispatch):
        out.append(AddService(t, new.key, new.chain))
    return out


def diff_script(old: Rendered | None, new: Rendered | None) -> list[str]:
    """`diff_ops` as nft commands."""
    return [op.nft() for op in diff_ops(old, new)]
