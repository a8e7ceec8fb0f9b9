"""The desired-state model: plain frozen values that sources produce and dataplanes consume.

Nothing here does I/O. A `Config` (from the YAML file; with `source: kubernetes` its
services come from the API, lb/k8s/) holds `Service` values; the controller merges live
health into their `Backend` values and hands the result to every dataplane, which make
the world match it.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field, replace

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


class SchedulerName(enum.StrEnum):
    """The IPVS scheduler names (`ipvsadm -s`); what each is and can do: lb/sched/__init__.py."""

    RR = "rr"
    WRR = "wrr"
    LC = "lc"
    WLC = "wlc"
    SED = "sed"
    NQ = "nq"
    SH = "sh"
    MH = "mh"
    DH = "dh"
    FO = "fo"


class SchedFlag(enum.StrEnum):
    """Scheduler flags of sh and mh (IPVS service flags SCHED1 and SCHED2)."""

    FALLBACK = "fallback"  # IP_VS_SVC_F_SCHED1: probe onward when the hashed backend is unavailable
    PORT = "port"  # IP_VS_SVC_F_SCHED2: hash the client's source port too


class ProxyProtocol(enum.StrEnum):
    """The PROXY protocol version lb sends to a service's backends (`proxy_protocol`)."""

    V1 = "v1"  # the text line, as HAProxy's send-proxy
    V2 = "v2"  # the binary header, as HAProxy's send-proxy-v2


class SourceAddress(enum.StrEnum):
    """The address a TCP service connects to its backends from (`source`)."""

    PROXY = "proxy"  # lb's own: the backend sees lb (HAProxy's default)
    #: the client's, with an ephemeral port (IP_TRANSPARENT, as HAProxy's `source 0.0.0.0
    #: usesrc clientip`, Envoy's original_src): the backend sees the client, as through
    #: the kernel paths; its replies must route back through lb (lb/proxy/transparent.py)
    TRANSPARENT = "transparent"


class Mode(enum.StrEnum):
    """Which dataplane carries the services (`dataplane:` in the config, `--dataplane`)."""

    USERSPACE = "userspace"
    IPVS = "ipvs"
    NFTABLES = "nftables"
    AUTO = "auto"  # a kernel dataplane for the services that are stable, userspace else


class AdminState(enum.StrEnum):
    """What the operator asked for a backend (file or admin API)."""

    READY = "ready"
    DRAIN = "drain"  # weight 0: no new connections, health checks go on
    MAINT = "maint"  # weight 0 and health checks stopped


class BackendState(enum.StrEnum):
    """What a backend is, as shown to operators: admin intent combined with health."""

    UP = "UP"
    DOWN = "DOWN"
    DRAIN = "DRAIN"
    MAINT = "MAINT"


def backend_state(admin: AdminState, healthy: bool) -> BackendState:
    """Combine admin state and health: maintenance wins, then a failing check, then drain."""
    if admin is AdminState.MAINT:
        return BackendState.MAINT
    if not healthy:
        return BackendState.DOWN
    if admin is AdminState.DRAIN:
        return BackendState.DRAIN
    return BackendState.UP


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """An IP address and a port: a VIP:port or a backend address:port."""

    ip: IPAddress
    port: int

    def __hash__(self) -> int:
        # Endpoints key every table of services and backends: ipaddress would hash through
        # hex() each time. Computed, not kept: a kept hash was 4 MB at 100,000 backends,
        # for 0.1 us saved per lookup.
        return int(self.ip) << 16 | self.port

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse `1.2.3.4:80` or `[::1]:80`; raise ValueError with a message fit for users."""
        text = text.strip()
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"{text!r} is not ADDRESS:PORT (IPv6 is written [addr]:port)")
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"{text!r} is not ADDRESS:PORT")
            if ":" in host:
                raise ValueError(f"{text!r}: write an IPv6 address as [addr]:port")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{host!r} is not an IP address (host names are not resolved)"
            ) from None
        if not port_text.isdecimal():
            raise ValueError(f"port {port_text!r} is not a number")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 1-65535")
        return cls(ip, port)

    @property
    def family(self) -> int:
        return self.ip.version

    def sockaddr(self) -> tuple[str, int]:
        return (str(self.ip), self.port)

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class Persistence:
    """Client-IP affinity, as `ipvsadm -p TIMEOUT -M NETMASK`.

    `prefix_len` is the netmask as a prefix length (IPv4 /32 = 255.255.255.255; for IPv6
    IPVS takes a prefix length directly).
    """

    timeout: int
    prefix_len: int


class CheckKind(enum.StrEnum):
    TCP = "tcp"
    HTTP = "http"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    kind: CheckKind
    interval: float
    timeout: float
    rise: int
    fall: int
    path: str = "/"
    port: int | None = None  # probe this port instead of the backend's


@dataclass(frozen=True, slots=True)
class Backend:
    """One destination of a service, in the order `ipvsadm -a` would add it.

    `max_connections` / `resume_below` are the IPVS upper / lower thresholds (0 = none):
    at max_connections active+inactive connections the backend is overloaded and gets no
    new connections until it drops below resume_below (default: 3/4 of the maximum).
    `healthy` is filled in by the controller from health checks; sources leave it True.
    """

    address: Endpoint
    weight: int = 1
    admin: AdminState = AdminState.READY
    max_connections: int = 0
    resume_below: int = 0
    healthy: bool = True

    @property
    def state(self) -> BackendState:
        return backend_state(self.admin, self.healthy)

    @property
    def effective_weight(self) -> int:
        """The weight a dataplane programs: quiesced (0) unless the backend is UP."""
        return self.weight if self.state is BackendState.UP else 0


#: IPVS default timeouts (seconds): TCP established, TCP after FIN, UDP.
TCP_IDLE_TIMEOUT = 900.0
UDP_IDLE_TIMEOUT = 300.0
UDP_MAX_FLOWS = 65536


@dataclass(frozen=True, slots=True)
class Service:
    """A virtual service: protocol + VIP:port in front of ordered backends."""

    name: str
    protocol: Protocol
    listen: Endpoint
    scheduler: SchedulerName = SchedulerName.WLC
    flags: frozenset[SchedFlag] = frozenset()
    persistence: Persistence | None = None
    health_check: HealthCheck | None = None
    backends: tuple[Backend, ...] = ()
    connect_timeout: float = 5.0
    idle_timeout: float = TCP_IDLE_TIMEOUT
    retries: int = 1
    max_connections: int = 0  # 0 = unlimited (TCP); UDP: the flow-table bound
    access_log: bool = False  # log one line per connection / flow
    #: clients allowed to connect (empty: everyone); others are refused (TCP) or their
    #: datagrams dropped (UDP). Kubernetes: loadBalancerSourceRanges.
    allowed_sources: tuple[IPNetwork, ...] = ()
    #: TCP: send a PROXY protocol header to each backend first (the client's address)
    proxy_protocol: ProxyProtocol | None = None
    #: TCP: each client first sends a PROXY protocol header (v1 or v2), whose address is
    #: the client's for scheduling and for proxy_protocol; without one it is refused
    accept_proxy_protocol: bool = False
    #: TCP: connect to the backends from lb's address (proxy) or the client's (transparent)
    source_address: SourceAddress = SourceAddress.PROXY
    #: protocol + listen, made once: every table of services is keyed by it
    key: ServiceKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", ServiceKey(self.protocol, self.listen))

    def with_backends(self, backends: tuple[Backend, ...]) -> Service:
        return replace(self, backends=backends)


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    """What identifies a service to the kernel and to its listener: protocol + VIP:port."""

    protocol: Protocol
    listen: Endpoint
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.protocol, self.listen)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[ServiceKey], tuple[Protocol, Endpoint]]:
        # a str enum's hash differs between processes (lb.loader's child makes Configs)
        return (ServiceKey, (self.protocol, self.listen))

    def __str__(self) -> str:
        return f"{self.protocol}/{self.listen}"


#: Where the admin API listens unless the config says otherwise.
ADMIN_DEFAULT = Endpoint(ipaddress.ip_address("127.0.0.1"), 9090)
HEALTHZ_DEFAULT = Endpoint(ipaddress.ip_address("0.0.0.0"), 10256)  # kube-proxy's


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The admin HTTP API: loopback only unless `allow_remote`, which needs a token."""

    enabled: bool = True
    listen: Endpoint = ADMIN_DEFAULT
    allow_remote: bool = False
    token_file: str | None = None
    #: /metrics: per-backend (and health-check) series too, not only per service
    backend_metrics: bool = False


@dataclass(frozen=True, slots=True)
class OffloadSettings:
    """How services move to a kernel dataplane (`dataplane: ipvs | nftables | auto`)."""

    hold_down: float = 10.0  # auto: unchanged this long before a service is promoted
    churn_limit: int = 3  # auto: this many changes within hold_down demote a service
    drain_timeout: float = 300.0  # the longest a removed or demoted destination drains
    device: str = "lb0"  # the dummy device holding the offloaded VIPs
    #: the longest a persistent service waits in userspace for its templates to expire
    #: before a promote into a kernel that cannot take them (IPVS)
    affinity_wait: float = 300.0
    #: nftables: packets (both directions) after which an established flow of a service
    #: goes into the flowtable, past the forwarding path (0: no flowtable)
    flow_threshold: int = 20


@dataclass(frozen=True, slots=True)
class KubernetesSettings:
    """`source: kubernetes`: lb as a node proxy, services from the API (lb/k8s/)."""

    #: at most one sync this often: half kube-proxy's 1 s, so that a change's programming
    #: latency stays under 1 s at the 99th percentile (docs/kubernetes.md)
    min_sync_period: float = 0.5
    sync_period: float = 30.0  # at least one sync this often
    default_scheduler: SchedulerName = SchedulerName.RR  # kube-proxy's IPVS mode default
    nodeport_addresses: tuple[IPAddress, ...] = ()  # empty: the Node's InternalIP/ExternalIP
    kubeconfig: str | None = None  # None: $KUBECONFIG, else the in-cluster service account
    node_name: str | None = None  # None: $NODE_NAME, else the host name
    #: /healthz and /livez as kube-proxy serves them (lb/k8s/health.py); None: not served
    healthz_address: Endpoint | None = HEALTHZ_DEFAULT


@dataclass(frozen=True, slots=True)
class Config:
    services: tuple[Service, ...] = ()
    shutdown_grace: float = 30.0
    admin: AdminSettings = AdminSettings()
    dataplane: Mode = Mode.USERSPACE
    offload: OffloadSettings = OffloadSettings()
    source: str = "file"  # where services come from: file | kubernetes (the YAML's `source`)
    kubernetes: KubernetesSettings = KubernetesSettings()
    path: str = field(default="", compare=False)  # the file it was loaded from, for messages
