"""What dataplanes count and report.

`Counters` are bumped on the data path: plain attribute increments, no locks, no dict
rebuilding. `observe()` on every dataplane returns `ServiceSnapshot`s built from them,
the one shape the admin API, `lb list` and the metrics read, whatever the dataplane.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from lb.model import Backend, Endpoint, Protocol, Service


class Placement(enum.StrEnum):
    """Where a service is carried (`lb list`, the admin API's `offload`)."""

    USERSPACE = "userspace"
    KERNEL = "kernel"
    DEMOTING = "demoting"  # IPVS hands new connections back while its NAT ones drain


@dataclass(frozen=True, slots=True)
class Offload:
    """Where a service is carried, and why there."""

    placement: Placement
    reason: str


class ErrorReason(enum.StrEnum):
    REFUSED = "refused"  # the backend refused the connection (RST / ICMP port unreachable)
    CONNECT_FAILED = "connect_failed"  # any other connect error (unreachable, ...)
    TIMEOUT = "timeout"  # connect timeout
    LIMIT = "limit"  # a connection or flow limit was reached (service, or every backend's)
    NO_BACKEND = "no_backend"  # the scheduler had no usable backend
    EXHAUSTED = "exhausted"  # lb was out of descriptors or memory (lb.exhaustion)
    SOURCE = "source"  # the client's address is not in the service's allowed_sources
    PROXY = "proxy_header"  # accept_proxy_protocol: no valid PROXY header (in time)

    def describe(self) -> str:
        return _DESCRIBE[self]


_DESCRIBE = {
    ErrorReason.REFUSED: "refused by the backend",
    ErrorReason.CONNECT_FAILED: "failed to connect",
    ErrorReason.TIMEOUT: "timed out connecting",
    ErrorReason.LIMIT: "over a connection limit",
    ErrorReason.NO_BACKEND: "with no usable backend",
    ErrorReason.EXHAUSTED: "refused: lb was out of descriptors or memory",
    ErrorReason.SOURCE: "refused: the client is not in allowed_sources",
    ErrorReason.PROXY: "refused: no valid PROXY protocol header (missing, malformed or late)",
}


NO_ERRORS: Mapping[ErrorReason, int] = MappingProxyType(dict.fromkeys(ErrorReason, 0))


class Counters:
    """Totals for a service or one of its backends."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "conns",
        "errors",
        "packets_in",
        "packets_out",
        "resets",
    )

    def __init__(self) -> None:
        self.conns = 0  # connections (TCP) or flows (UDP) scheduled
        self.bytes_in = 0  # client -> backend
        self.bytes_out = 0  # backend -> client
        self.packets_in = 0  # UDP datagrams client -> backend
        self.packets_out = 0
        self.resets = 0  # TCP connections that ended with a reset, from either side
        #: by reason; the shared NO_ERRORS (all zero) until the first one: a dict per
        #: backend was a tenth of lb's memory at 10,000 services x 10 backends
        self.errors: Mapping[ErrorReason, int] = NO_ERRORS

    def error(self, reason: ErrorReason) -> None:
        errors = self.errors
        if errors is NO_ERRORS:
            errors = self.errors = dict.fromkeys(ErrorReason, 0)
        assert isinstance(errors, dict)
        errors[reason] += 1

    def totals(self) -> Totals:
        return Totals(
            conns=self.conns,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            packets_in=self.packets_in,
            packets_out=self.packets_out,
            resets=self.resets,
            errors=dict(self.errors),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Totals:
    """A copy of Counters at one moment."""

    conns: int
    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int
    errors: dict[ErrorReason, int]
    resets: int = 0  # the kernel dataplanes do not see them


@dataclass(frozen=True, slots=True)
class Stat:
    """One counter of Totals and everything that shows it: the Prometheus families (for
    services and backends), the admin API's `connections` object, `lb list --stats`,
    and its rate (lb.rates.Rates, `lb list --rate`). Adding a counter: the attribute in
    Counters and Totals, bumped where it happens, and one entry in STATS
    (docs/architecture.md, "How to add a metric")."""

    attr: str  # the attribute of Counters and Totals
    service_metric: str  # Prometheus family (a counter: exposed with _total)
    service_help: str
    backend_metric: str
    backend_help: str
    view: tuple[str, ...]  # where it sits in the admin API's `connections` object
    column: str | None  # `lb list --stats` header (ipvsadm's columns; None: not one)
    rate: str | None  # the attribute of lb.rates.Rates that smooths it, if any
    rate_column: str | None  # `lb list --rate` header
    only: Protocol | None = None  # shown for services of this protocol only


#: Those with a column in the column order of `ipvsadm -Ln --stats` and `--rate`.
STATS: tuple[Stat, ...] = (
    Stat("conns", "lb_service_connections",
         "Client connections (TCP) or flows (UDP) given a backend.",
         "lb_backend_connections", "Connections or flows scheduled to the backend.",
         ("total",), "Conns", "cps", "CPS"),
    Stat("packets_in", "lb_service_in_packets", "Datagrams from clients (UDP).",
         "lb_backend_in_packets", "Datagrams sent to the backend (UDP).",
         ("packets", "in"), "InPkts", "in_pps", "InPPS", Protocol.UDP),
    Stat("packets_out", "lb_service_out_packets", "Datagrams back to clients (UDP).",
         "lb_backend_out_packets", "Datagrams from the backend (UDP).",
         ("packets", "out"), "OutPkts", "out_pps", "OutPPS", Protocol.UDP),
    Stat("bytes_in", "lb_service_in_bytes", "Bytes from clients towards backends.",
         "lb_backend_in_bytes", "Bytes sent to the backend.",
         ("bytes", "in"), "InBytes", "in_bps", "InBPS"),
    Stat("bytes_out", "lb_service_out_bytes", "Bytes from backends back to clients.",
         "lb_backend_out_bytes", "Bytes received from the backend.",
         ("bytes", "out"), "OutBytes", "out_bps", "OutBPS"),
    Stat("resets", "lb_service_resets",
         "TCP connections that ended with a reset from either side (userspace dataplane).",
         "lb_backend_resets", "TCP connections to the backend that ended with a reset.",
         ("resets",), None, None, None, Protocol.TCP),
)  # fmt: skip


#: The counters lb list shows as columns, and those with a rate (Rates' fields).
COLUMNS: tuple[Stat, ...] = tuple(s for s in STATS if s.column is not None)
RATED: tuple[Stat, ...] = tuple(s for s in STATS if s.rate is not None)


def stat_value(totals: Totals, stat: Stat) -> int:
    value: int = getattr(totals, stat.attr)
    return value


def shown(stat: Stat, protocol: Protocol) -> bool:
    return stat.only is None or stat.only is protocol


def totals_json(t: Totals, protocol: Protocol) -> dict[str, object]:
    """The admin API's `connections` object: STATS at their `view` paths (those of the
    other protocol null), and the errors by reason."""
    out: dict[str, object] = {}
    for stat in STATS:
        *groups, leaf = stat.view
        node = out
        for g in groups:
            child = node.setdefault(g, {})
            assert isinstance(child, dict)
            node = child
        node[leaf] = stat_value(t, stat)
    for stat in STATS:
        if not shown(stat, protocol):
            out[stat.view[0]] = None
    out["errors"] = {r.value: n for r, n in t.errors.items()}
    return out


@dataclass(frozen=True, slots=True)
class BackendSnapshot:
    address: Endpoint
    backend: Backend | None  # the desired backend; None: removed from the config, draining
    weight: int  # the weight the scheduler uses now (0 when not UP, or removed)
    active: int
    inactive: int
    persistent: int  # persistence templates pointing here
    overloaded: bool
    totals: Totals


@dataclass(frozen=True, slots=True)
class ServiceSnapshot:
    service: Service
    dataplane: str
    listening: bool
    open: int  # open connections (TCP) or flows (UDP)
    totals: Totals
    backends: tuple[BackendSnapshot, ...]  # in the dataplane's list order (newest first)
