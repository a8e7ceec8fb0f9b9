"""How services look in nftables, and the transaction that moves the kernel from one set
of services to another: pure code, no I/O (offload/nftables.py runs it).

One table, `ip lb`, whatever the number of services:
- a verdict map `services` from (VIP, protocol, port) to the service's chain, looked up
  once per new connection from the nat hooks (constant time, as kube-proxy's nftables
  proxier does);
- per service a chain `svc_<id>` that picks a backend: a persistence check per backend
  first (`ip saddr & mask @aff_...`), then `numgen inc` (rr, wrr) or `jhash` (sh) over a
  verdict map;
- per backend a chain `ep_<id>_<n>` that counts the connection (a named counter, which
  outlives rewrites), renews the client's affinity and DNATs to address:port;
- `masq_paths`: masquerade for hairpin (a backend reaching itself through the VIP).

Each service's objects are rendered on their own, so a change to one service rewrites only
that service's chains: the transaction's size does not grow with the number of services.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import reduce

from lb.model import (
    Endpoint,
    IPAddress,
    Protocol,
    SchedFlag,
    SchedulerName,
    Service,
    ServiceKey,
)
from lb.virtual_service import VirtualService

TABLE = "lb"
#: Longest cycle a `numgen` map may hold: wrr weights whose cycle is longer stay in
#: userspace (the map is rebuilt whole on every change to the service).
MAX_CYCLE = 4096
AFFINITY_SIZE = 65535
EXPRESSIBLE = frozenset({SchedulerName.RR, SchedulerName.WRR, SchedulerName.SH})


def not_expressible_nft(s: Service) -> str | None:
    """Why nftables NAT cannot carry `s` (beyond what no kernel path can), or None."""
    if s.scheduler not in EXPRESSIBLE:
        return (
            f"scheduler {s.scheduler} is not expressible in nftables (rr, wrr and sh are); "
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
    weights = [b.effective_weight for b in s.backends if b.effective_weight > 0]
    if s.scheduler is not SchedulerName.WRR or not weights:
        return len(weights)
    g = reduce(math.gcd, weights)
    return sum(w // g for w in weights)


def cycle(s: Service) -> list[Endpoint]:
    """One period of the picks the kernel's scheduler makes on a fresh service with these
    backends (rr goes down the list, wrr interleaves by weight), computed by the userspace
    reference itself."""
    vs = VirtualService(s.protocol, s.listen, s.scheduler)
    for b in s.backends:
        if b.effective_weight > 0:
            vs.add_dest(b.address, b.effective_weight)
    picks = []
    for _ in range(cycle_length(s)):
        conn = vs.connect(b"\0\0\0\0", 0, 0.0)
        assert conn is not None
        vs.release(conn, 0.0)
        picks.append(conn.dest.endpoint)
    return picks


@dataclass(frozen=True, slots=True)
class NatPath:
    """Packets from `source` to `backend` (after the kernel's DNAT) that need masquerade."""

    source: IPAddress
    protocol: Protocol
    backend: Endpoint

    def sort_key(self) -> tuple[int, int, str, int]:
        return (int(self.source), int(self.backend.ip), self.protocol.value, self.backend.port)


def masq_elements(paths: Iterable[NatPath]) -> str:
    """The elements of a `masq_paths` set (source . backend ip . protocol . port)."""
    return ", ".join(
        f"{p.source} . {p.backend.ip} . {p.protocol.value} . {p.backend.port}"
        for p in sorted(paths, key=NatPath.sort_key)
    )


def key_element(key: ServiceKey) -> str:
    """A service key as a set element: `{ VIP . protocol . port }`."""
    return f"{{ {key.listen.ip} . {key.protocol.value} . {key.listen.port} }}"


@dataclass(frozen=True, slots=True)
class Names:
    """The names of one backend's objects within its service."""

    chain: str  # ep_<service>_<backend>: counts, renews affinity, DNATs
    counter: str  # c_<service>_<backend>
    affinity: str  # aff_<service>_<backend>: clients that stick to it

    @classmethod
    def of(cls, key: ServiceKey, e: Endpoint) -> Names:
        tail = f"{service_id(key)}_{str(e.ip).replace('.', '_')}_{e.port}"
        return cls(f"ep_{tail}", f"c_{tail}", f"aff_{tail}")


@dataclass(frozen=True, slots=True)
class Rendered:
    """A service's objects as nft definitions, by kind and name."""

    key: ServiceKey
    chain: str
    rules: tuple[str, ...]  # the service chain's rules
    endpoints: dict[str, tuple[Names, str]] = field(default_factory=dict)  # chain: rule
    sets: dict[str, str] = field(default_factory=dict)  # name: definition
    counters: frozenset[str] = frozenset()
    dispatch: bool = True  # in the services map (False: no backend, the listener answers)


def render(s: Service) -> Rendered:
    proto = s.protocol.value
    endpoints: dict[str, tuple[Names, str]] = {}
    sets: dict[str, str] = {}
    counters = set()
    mask = _mask(s.persistence.prefix_len) if s.persistence is not None else None
    for b in s.backends:
        n = Names.of(s.key, b.address)
        counters.add(n.counter)
        steps = [f'counter name "{n.counter}"']
        if s.persistence is not None:
            sets[n.affinity] = (
                f"{{ type ipv4_addr; size {AFFINITY_SIZE}; flags dynamic,timeout; "
                f"timeout {s.persistence.timeout}s; }}"
            )
            steps.append(f"update @{n.affinity} {{ ip saddr & {mask} }}")
        steps.append(f"meta l4proto {proto} dnat to {b.address.ip}:{b.address.port}")
        endpoints[n.chain] = (n, " ".join(steps))
    live = available(s)
    rules: list[str] = []
    if mask is not None:
        for e in live:
            n = Names.of(s.key, e)
            rules.append(f"ip saddr & {mask} @{n.affinity} goto {n.chain}")
    if live:
        rules.append(_dispatch(s, live))
    return Rendered(
        s.key,
        f"svc_{service_id(s.key)}",
        tuple(rules),
        endpoints,
        sets,
        frozenset(counters),
        dispatch=bool(live),
    )


def _mask(prefix_len: int) -> str:
    value = (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF
    return ".".join(str((value >> shift) & 0xFF) for shift in (24, 16, 8, 0))


def _vmap(key: ServiceKey, picks: Sequence[Endpoint]) -> str:
    return ", ".join(f"{i} : goto {Names.of(key, e).chain}" for i, e in enumerate(picks))


def _dispatch(s: Service, live: list[Endpoint]) -> str:
    if s.scheduler is SchedulerName.SH:
        # One slot per unit of weight: each backend's share of clients is its weight's.
        weight = {b.address: b.effective_weight for b in s.backends}
        slots = [e for e in live for _ in range(weight[e])]
        key = "ip saddr . th sport" if SchedFlag.PORT in s.flags else "ip saddr"
        return f"jhash {key} mod {len(slots)} seed 0x0 vmap {{ {_vmap(s.key, slots)} }}"
    picks = cycle(s)
    return f"numgen inc mod {len(picks)} vmap {{ {_vmap(s.key, picks)} }}"


# --- transactions ----------------------------------------------------------------------------


def base_script(hairpin: Iterable[NatPath] = ()) -> list[str]:
    """The table with its hooks, map and masquerade set, empty of services (replaces any
    table of that name, atomically, together with what follows it in the transaction)."""
    elements = masq_elements(hairpin)
    return [
        f"table ip {TABLE}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
        "    map services { type ipv4_addr . inet_proto . inet_service : verdict; }",
        "    set masq_paths { type ipv4_addr . ipv4_addr . inet_proto . inet_service; "
        + (f"elements = {{ {elements} }}; " if elements else "")
        + "}",
        "    chain prerouting {",
        "        type nat hook prerouting priority dstnat; policy accept;",
        "        ip daddr . meta l4proto . th dport vmap @services",
        "    }",
        "    chain output {",
        "        type nat hook output priority -100; policy accept;",
        "        ip daddr . meta l4proto . th dport vmap @services",
        "    }",
        "    chain postrouting {",
        "        type nat hook postrouting priority srcnat; policy accept;",
        "        ip saddr . ip daddr . meta l4proto . th dport @masq_paths masquerade",
        "    }",
        "}",
    ]


def _element(key: ServiceKey, chain: str) -> str:
    return f"{{ {key.listen.ip} . {key.protocol.value} . {key.listen.port} : goto {chain} }}"


def diff_script(old: Rendered | None, new: Rendered | None) -> list[str]:
    """The nft commands that turn one service's objects from `old` into `new` (either may
    be None: a service added or removed). Empty when nothing changed. Order matters inside
    the transaction: references go before what they refer to is deleted, and objects exist
    before rules refer to them."""
    if old == new:
        return []
    t = f"ip {TABLE}"
    out: list[str] = []
    if old is not None and old.dispatch and (new is None or not new.dispatch):
        out.append(f"delete element {t} services {key_element(old.key)}")
    old_eps = old.endpoints if old else {}
    new_eps = new.endpoints if new else {}
    old_sets = old.sets if old else {}
    new_sets = new.sets if new else {}
    if old is not None:
        out.append(f"flush chain {t} {old.chain}")  # drops its references to endpoints
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
            out.append(f"delete chain {t} {name}")
        elif name in rewrite:
            out.append(f"flush chain {t} {name}")
    for name in old_sets:
        if name in recreated:
            out.append(f"delete set {t} {name}")
    for name in (old.counters if old else frozenset()) - (new.counters if new else frozenset()):
        out.append(f"delete counter {t} {name}")
    if new is None:
        assert old is not None
        out.append(f"delete chain {t} {old.chain}")
        return out
    for name in sorted(new.counters - (old.counters if old else frozenset())):
        out.append(f"add counter {t} {name}")
    for name in sorted(changed_sets):
        out.append(f"add set {t} {name} {new_sets[name]}")
    for name, (_, rule) in new_eps.items():
        if name in rewrite:
            out.append(f"add chain {t} {name}")
            out.append(f"add rule {t} {name} {rule}")
    if old is None:
        out.append(f"add chain {t} {new.chain}")
    out += [f"add rule {t} {new.chain} {rule}" for rule in new.rules]
    if new.dispatch and (old is None or not old.dispatch):
        out.append(f"add element {t} services {_element(new.key, new.chain)}")
    return out
