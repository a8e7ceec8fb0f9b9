"""IPVS's objects as plain values: a virtual service, a real server, a connection, the
service flags. Pure (no netlink here: offload/ipvs_netlink.py sends and reads them), so
that the policy can say how a service looks in IPVS without the IPVS dataplane."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from lb.model import Endpoint, IPAddress, Protocol, ServiceKey

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
SYNC_PER_MESSAGE = 40  # IPv4 entries per datagram that fit a 1500-byte MTU (sync_maxlen)
SYNC_PER_MESSAGE_V6 = 20  # IPv6 entries (72 bytes each) in the same 1,472 bytes
_F_TEMPLATE = 0x1000  # IP_VS_CONN_F_TEMPLATE
_STYPE_F_INET6 = 1  # the entry's type: an IPv6 connection (struct ip_vs_sync_v6)
_PROTO_NUMBER = {Protocol.TCP: 6, Protocol.UDP: 17}


def sync_messages(
    key: ServiceKey,
    templates: Iterable[tuple[IPAddress, Endpoint, float]],
    syncid: int = SYNC_ID,
    per_message: int | None = None,
) -> list[bytes]:
    """Version-1 sync messages that make the kernel's backup daemon create persistence
    templates for `key`: each (client network, backend, seconds left). The backend must
    be a real server of the service already, or the kernel creates a template that the
    first use drops. The entries are of the service's family (struct ip_vs_sync_v4, 36
    bytes, or ip_vs_sync_v6, 72); the messages themselves travel over IPv4 either way."""
    v6 = key.listen.family == 6
    size = 72 if v6 else 36
    addr = "16s" if v6 else "4s"
    layout = f"!BBHIHHHHII{addr}{addr}{addr}"
    entries = []
    vip = key.listen
    for client, backend, left in templates:
        entries.append(
            struct.pack(
                layout,
                _STYPE_F_INET6 if v6 else 0,  # type
                _PROTO_NUMBER[key.protocol],
                size,  # version 0, size
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
    per_message = per_message or (SYNC_PER_MESSAGE_V6 if v6 else SYNC_PER_MESSAGE)
    out = []
    for start in range(0, len(entries), per_message):
        chunk = entries[start : start + per_message]
        length = 8 + size * len(chunk)
        out.append(struct.pack("!BBHBBH", 0, syncid, length, len(chunk), 1, 0) + b"".join(chunk))
    return out
