"""IPVS's objects as plain values: a virtual service, a real server, a connection, the
service flags. Pure (no netlink here: offload/ipvs_netlink.py sends and reads them), so
that the policy can say how a service looks in IPVS without the IPVS dataplane."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

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


# --- persistence templates through IPVS's sync protocol (docs/dataplanes/ipvs.md) -------

SYNC_GROUP = ("224.0.0.81", 8848)  # IPVS's default IPv4 sync group and port
SYNC_ID = 76  # lb's sync id: the backup daemon takes only messages that carry it
SYNC_PER_MESSAGE = 40  # entries per datagram that fit a 1500-byte MTU (sync_maxlen)
_F_TEMPLATE = 0x1000  # IP_VS_CONN_F_TEMPLATE
_PROTO_NUMBER = {Protocol.TCP: 6, Protocol.UDP: 17}


def sync_messages(
    key: ServiceKey,
    templates: Iterable[tuple[IPv4Address, Endpoint, float]],
    syncid: int = SYNC_ID,
    per_message: int = SYNC_PER_MESSAGE,
) -> list[bytes]:
    """Version-1 sync messages that make the kernel's backup daemon create persistence
    templates for `key`: each (client network, backend, seconds left). The backend must
    be a real server of the service already, or the kernel creates a template that the
    first use drops. IPv4 only (an IPv4 service's templates are IPv4)."""
    entries = []
    vip = key.listen
    for client, backend, left in templates:
        entries.append(
            struct.pack(
                "!BBHIHHHHII4s4s4s",
                0,  # type: IPv4
                _PROTO_NUMBER[key.protocol],
                36,  # version 0, size
                _F_TEMPLATE,  # the forwarding method is the real server's
                0,  # state
                0,  # client port: 0 for a template
                vip.port,
                backend.port,
                0,  # fwmark
                max(1, math.ceil(left)),  # 0 would mean the default, 180 s
                client.packed,
                vip.ip.packed,
                backend.ip.packed,
            )
        )
    out = []
    for start in range(0, len(entries), per_message):
        chunk = entries[start : start + per_message]
        size = 8 + 36 * len(chunk)
        out.append(struct.pack("!BBHBBH", 0, syncid, size, len(chunk), 1, 0) + b"".join(chunk))
    return out
