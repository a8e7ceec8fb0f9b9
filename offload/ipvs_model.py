"""IPVS's objects as plain values: a virtual service, a real server, a connection, the
service flags. Pure (no netlink here: offload/ipvs_netlink.py sends and reads them), so
that the policy can say how a service looks in IPVS without the IPVS dataplane."""

from __future__ import annotations

from dataclasses import dataclass, field

from lb.model import Endpoint, Protocol, ServiceKey

# Service flags (include/uapi/linux/ip_vs.h)
F_PERSISTENT = 0x0001
F_HASHED = 0x0002  # kernel-internal, shows up in dumps
F_ONEPACKET = 0x0004
F_SCHED1 = 0x0008  # sh-fallback / mh-fallback
F_SCHED2 = 0x0010  # sh-port / mh-port
FLAGS_MASK = 0xFFFF

FWD_MASQ = 0  # NAT
FWD_LOCAL = 1


@dataclass(frozen=True, slots=True)
class KStats:
    conns: int = 0
    inpkts: int = 0
    outpkts: int = 0
    inbytes: int = 0
    outbytes: int = 0


@dataclass(frozen=True, slots=True)
class KService:
    """A virtual service as the kernel has it (or should)."""

    key: ServiceKey
    scheduler: str
    flags: int = 0  # F_PERSISTENT | F_SCHED1 | F_SCHED2 (never F_HASHED)
    timeout: int = 0  # persistence timeout, seconds
    prefix_len: int = 32  # persistence netmask
    stats: KStats = field(default=KStats(), compare=False)


@dataclass(frozen=True, slots=True)
class KDest:
    """A real server as the kernel has it (or should)."""

    endpoint: Endpoint
    weight: int
    u_threshold: int = 0
    l_threshold: int = 0
    fwd: int = FWD_MASQ
    active: int = field(default=0, compare=False)
    inactive: int = field(default=0, compare=False)
    persistent: int = field(default=0, compare=False)
    stats: KStats = field(default=KStats(), compare=False)


@dataclass(frozen=True, slots=True)
class KConn:
    """One entry of the kernel's connection table (/proc/net/ip_vs_conn)."""

    protocol: Protocol
    client: Endpoint
    vip: Endpoint
    dest: Endpoint
    state: str
    expires: int  # seconds
