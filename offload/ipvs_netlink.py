"""The kernel's IPVS over generic netlink (pyroute2's AsyncIPVS), behind a small interface.

Like kube-proxy's `pkg/proxy/ipvs/util`: a handful of verbs on plain values, so the
reconciler can be unit-tested against a fake and run for real against the kernel.
pyroute2 pitfalls handled here (docs/dataplanes/ipvs.md): destinations default to direct
routing, so the forwarding method is always given; its "update" word deletes, so edits
use "set"; there is no single-destination get, so destinations are dumped.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

from lb.model import Endpoint, IPAddress, Protocol, ServiceKey
from offload.ipvs_model import F_HASHED, FLAGS_MASK, FWD_MASQ, KConn, KDest, KService, KStats
from offload.nlthread import NetlinkThread

_PROTO = {Protocol.TCP: socket.IPPROTO_TCP, Protocol.UDP: socket.IPPROTO_UDP}
_PROTO_BACK = {v: k for k, v in _PROTO.items()}


class IpvsUnavailable(Exception):
    """The kernel has no IPVS here, or lb may not drive it."""


#: TCP states in which a connection can no longer carry data.
TCP_DONE = frozenset({"TIME_WAIT", "CLOSE", "NONE"})
#: A UDP entry idle this long is taken as finished (it would live UDP_TIMEOUT seconds).
UDP_IDLE_DONE = 10
UDP_TIMEOUT = 300


def _hex_endpoint(addr: str, port: str) -> Endpoint:
    """An address as the table prints it: IPv4 as 8 hex digits, IPv6 as the kernel's
    `%pI6` (eight groups of four, uncompressed); the port in hex."""
    ip: IPAddress = (
        ipaddress.IPv6Address(addr) if ":" in addr else ipaddress.IPv4Address(int(addr, 16))
    )
    return Endpoint(ip, int(port, 16))


def read_conn_table(
    path: str = "/proc/net/ip_vs_conn", *, templates: bool = False
) -> list[KConn] | None:
    """The TCP and UDP entries (IPv4 and IPv6), or with `templates` the persistence
    templates alone; None if the table is unreadable. There is no netlink dump of
    connections: this file is the only listing. A template is <protocol, client network,
    port 0, VIP, port, backend, port> (ip_vs_sched_persist()), and its expiry the time it
    has left."""
    try:
        lines = Path(path).read_text().splitlines()[1:]
    except OSError:
        return None
    out = []
    for line in lines:
        f = line.split()
        if len(f) < 9 or f[0] not in ("TCP", "UDP"):
            continue
        try:
            client, vip, dest = (
                _hex_endpoint(f[1], f[2]),
                _hex_endpoint(f[3], f[4]),
                _hex_endpoint(f[5], f[6]),
            )
        except ValueError:  # not a line of this layout
            continue
        if (client.port == 0 or vip.port == 0) != templates:
            continue  # a template (or, with `templates`, a connection)
        out.append(KConn(Protocol(f[0].lower()), client, vip, dest, f[7], int(f[8])))
    return out


def read_templates(path: str = "/proc/net/ip_vs_conn") -> list[KConn] | None:
    return read_conn_table(path, templates=True)


def carries_data(c: KConn) -> bool:
    """Whether this connection may still move bytes (so it must not be cut)."""
    if c.protocol is Protocol.TCP:
        return c.state not in TCP_DONE
    return UDP_TIMEOUT - c.expires < UDP_IDLE_DONE


class IpvsClient(TypingProtocol):
    writes: int  # netlink writes so far (an apply with nothing to do makes none)

    async def services(self) -> list[KService]: ...

    async def dests(self, key: ServiceKey) -> list[KDest]:
        """The destinations in kernel list order: the most recently added first."""

    async def add_service(self, svc: KService) -> None: ...

    async def set_service(self, svc: KService) -> None: ...

    async def del_service(self, key: ServiceKey) -> None: ...

    async def add_dest(self, key: ServiceKey, dest: KDest) -> None: ...

    async def set_dest(self, key: ServiceKey, dest: KDest) -> None: ...

    async def del_dest(self, key: ServiceKey, endpoint: Endpoint) -> None: ...

    async def close(self) -> None: ...


def _stats(attrs: Any) -> KStats:
    if not attrs:
        return KStats()
    get = dict(attrs.get("attrs", [])).get
    return KStats(
        get("IPVS_STATS_ATTR_CONNS", 0),
        get("IPVS_STATS_ATTR_INPKTS", 0),
        get("IPVS_STATS_ATTR_OUTPKTS", 0),
        get("IPVS_STATS_ATTR_INBYTES", 0),
        get("IPVS_STATS_ATTR_OUTBYTES", 0),
    )


def _netmask(prefix_len: int, family: int) -> str:
    """IPVS_SVC_ATTR_NETMASK: a dotted mask for IPv4; for IPv6 the kernel reads the prefix
    length as a native u32, which pyroute2 can only send dressed as an IPv4 address."""
    if family == 4:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{prefix_len}").netmask)
    return str(ipaddress.IPv4Address(int.from_bytes(prefix_len.to_bytes(4, sys.byteorder), "big")))


def _prefix(netmask: str, family: int) -> int:
    value = int(ipaddress.IPv4Address(netmask))
    if family == 4:
        return bin(value).count("1")
    return int.from_bytes(value.to_bytes(4, "big"), sys.byteorder)


class NetlinkIpvs:
    """IpvsClient over pyroute2's AsyncIPVS (on the netlink thread: see nlthread.py)."""

    def __init__(self) -> None:
        self.writes = 0
        self._sock: Any = None
        self._nl = NetlinkThread.shared()

    async def open(self) -> NetlinkIpvs:
        await self._nl.run(self._open())
        return self

    async def _open(self) -> None:
        try:
            from pyroute2 import AsyncIPVS
            from pyroute2.netlink.exceptions import NetlinkError
        except ImportError as e:  # pragma: no cover - pyroute2 is a dependency
            raise IpvsUnavailable(f"pyroute2 is missing: {e}") from None
        sock = AsyncIPVS()
        try:
            await sock.setup_endpoint()
            await sock.service("dump")
        except NetlinkError as e:
            sock.close()
            if e.code == 2:
                raise IpvsUnavailable(
                    "this kernel has no IPVS (the ip_vs module is not loaded)"
                ) from None
            if e.code == 1:
                raise IpvsUnavailable(
                    "not allowed to drive IPVS (lb needs CAP_NET_ADMIN)"
                ) from None
            raise IpvsUnavailable(f"IPVS netlink: {e}") from None
        self._sock = sock

    async def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self._nl.loop.call_soon_threadsafe(sock.close)

    # --- building pyroute2 requests ------------------------------------------------------

    @staticmethod
    def _service_obj(key: ServiceKey, svc: KService | None = None) -> Any:
        from pyroute2 import IPVSService

        fields: dict[str, Any] = {
            "af": socket.AF_INET if key.listen.family == 4 else socket.AF_INET6,
            "addr": str(key.listen.ip),
            "port": key.listen.port,
            "protocol": _PROTO[key.protocol],
        }
        if svc is not None:
            fields.update(
                sched_name=svc.scheduler,
                flags={"flags": svc.flags, "mask": FLAGS_MASK},
                timeout=svc.timeout,
                netmask=_netmask(svc.prefix_len, key.listen.family),
            )
        return IPVSService(**fields)

    @staticmethod
    def _dest_obj(d: KDest | Endpoint) -> Any:
        from pyroute2 import IPVSDest

        if isinstance(d, Endpoint):
            return IPVSDest(addr=str(d.ip), port=d.port, fwd_method=FWD_MASQ)
        return IPVSDest(
            addr=str(d.endpoint.ip),
            port=d.endpoint.port,
            fwd_method=d.fwd,  # always explicit: pyroute2 defaults to direct routing
            weight=d.weight,
            u_thresh=d.u_threshold,
            l_thresh=d.l_threshold,
        )

    # --- reads ---------------------------------------------------------------------------

    async def services(self) -> list[KService]:
        return await self._nl.run(self._services())

    async def _services(self) -> list[KService]:
        out = []
        for msg in await self._sock.service("dump"):
            a = dict(msg.get("IPVS_CMD_ATTR_SERVICE")["attrs"])
            proto = _PROTO_BACK.get(a.get("IPVS_SVC_ATTR_PROTOCOL", 0))
            if proto is None or "IPVS_SVC_ATTR_ADDR" not in a:
                continue  # fwmark services, other protocols: not ours
            family = 4 if a.get("IPVS_SVC_ATTR_AF") == socket.AF_INET else 6
            key = ServiceKey(
                proto,
                Endpoint(ipaddress.ip_address(a["IPVS_SVC_ATTR_ADDR"]), a["IPVS_SVC_ATTR_PORT"]),
            )
            flags = a.get("IPVS_SVC_ATTR_FLAGS", {}).get("flags", 0) & ~F_HASHED
            out.append(
                KService(
                    key=key,
                    scheduler=a.get("IPVS_SVC_ATTR_SCHED_NAME", ""),
                    flags=flags,
                    timeout=a.get("IPVS_SVC_ATTR_TIMEOUT", 0),
                    prefix_len=_prefix(a.get("IPVS_SVC_ATTR_NETMASK", "255.255.255.255"), family),
                    stats=_stats(a.get("IPVS_SVC_ATTR_STATS64") or a.get("IPVS_SVC_ATTR_STATS")),
                )
            )
        return out

    async def dests(self, key: ServiceKey) -> list[KDest]:
        return await self._nl.run(self._dests(key))

    async def _dests(self, key: ServiceKey) -> list[KDest]:
        out = []
        for msg in await self._sock.dest("dump", service=self._service_obj(key)):
            a = dict(msg.get("IPVS_CMD_ATTR_DEST")["attrs"])
            out.append(
                KDest(
                    endpoint=Endpoint(
                        ipaddress.ip_address(a["IPVS_DEST_ATTR_ADDR"]), a["IPVS_DEST_ATTR_PORT"]
                    ),
                    weight=a.get("IPVS_DEST_ATTR_WEIGHT", 0),
                    u_threshold=a.get("IPVS_DEST_ATTR_U_THRESH", 0),
                    l_threshold=a.get("IPVS_DEST_ATTR_L_THRESH", 0),
                    fwd=a.get("IPVS_DEST_ATTR_FWD_METHOD", 0) & 0x7,
                    active=a.get("IPVS_DEST_ATTR_ACTIVE_CONNS", 0),
                    inactive=a.get("IPVS_DEST_ATTR_INACT_CONNS", 0),
                    persistent=a.get("IPVS_DEST_ATTR_PERSIST_CONNS", 0),
                    stats=_stats(a.get("IPVS_DEST_ATTR_STATS64") or a.get("IPVS_DEST_ATTR_STATS")),
                )
            )
        return out

    # --- writes --------------------------------------------------------------------------

    async def _write(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.writes += 1
        await self._nl.run(coro)

    async def add_service(self, svc: KService) -> None:
        await self._write(self._sock.service("add", service=self._service_obj(svc.key, svc)))

    async def set_service(self, svc: KService) -> None:
        await self._write(self._sock.service("set", service=self._service_obj(svc.key, svc)))

    async def del_service(self, key: ServiceKey) -> None:
        await self._write(self._sock.service("del", service=self._service_obj(key)))

    async def add_dest(self, key: ServiceKey, dest: KDest) -> None:
        svc = self._service_obj(key)
        await self._write(self._sock.dest("add", service=svc, dest=self._dest_obj(dest)))

    async def set_dest(self, key: ServiceKey, dest: KDest) -> None:
        svc = self._service_obj(key)
        await self._write(self._sock.dest("set", service=svc, dest=self._dest_obj(dest)))

    async def del_dest(self, key: ServiceKey, endpoint: Endpoint) -> None:
        svc = self._service_obj(key)
        await self._write(self._sock.dest("del", service=svc, dest=self._dest_obj(endpoint)))

    # --- the sync daemon (persistence templates in: offload/ipvs_sync.py) ----------------

    async def start_backup_daemon(self, device: str, syncid: int) -> None:
        """IPVS_CMD_NEW_DAEMON: a backup sync daemon listening on `device`."""
        await asyncio.to_thread(genl_request, "IPVS", daemon_command(NEW_DAEMON, device, syncid))

    async def stop_backup_daemon(self) -> None:
        """IPVS_CMD_DEL_DAEMON of the backup daemon."""
        await asyncio.to_thread(genl_request, "IPVS", daemon_command(DEL_DAEMON))

    async def backup_daemon(self) -> tuple[str, int] | None:
        """The running backup daemon's device and sync id (IPVS_CMD_GET_DAEMON), if any."""
        answers = await asyncio.to_thread(genl_request, "IPVS", (GET_DAEMON, b""), True)
        return backup_daemon_of(answers)


# The daemon commands are sent on a generic netlink socket of their own, written by hand:
# pyroute2's IPVS message has no layout for IPVS_CMD_ATTR_DAEMON.
NEW_DAEMON = 9  # IPVS_CMD_NEW_DAEMON
DEL_DAEMON = 10  # IPVS_CMD_DEL_DAEMON
GET_DAEMON = 11  # IPVS_CMD_GET_DAEMON
DAEMON_BACKUP = 2  # IP_VS_STATE_BACKUP
_ATTR_DAEMON = 3  # IPVS_CMD_ATTR_DAEMON, holding IPVS_DAEMON_ATTR_STATE (1), _MCAST_IFN (2),
# _SYNC_ID (3)
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP, _NLMSG_ERROR, _NLMSG_DONE = 0x1, 0x4, 0x300, 2, 3
_GENL_ID_CTRL, _CTRL_CMD_GETFAMILY, _CTRL_ATTR_FAMILY_ID, _CTRL_ATTR_FAMILY_NAME = 0x10, 3, 1, 2


def _nla(kind: int, data: bytes) -> bytes:
    size = 4 + len(data)
    return struct.pack("=HH", size, kind) + data + b"\0" * (-size % 4)


def daemon_command(cmd: int, device: str | None = None, syncid: int = 0) -> tuple[int, bytes]:
    """A generic netlink IPVS daemon command: (command, attributes)."""
    nested = _nla(1, struct.pack("=I", DAEMON_BACKUP))
    if device is not None:
        nested += _nla(2, device.encode() + b"\0") + _nla(3, struct.pack("=I", syncid))
    return cmd, _nla(_ATTR_DAEMON, nested)


def _attrs(data: bytes) -> dict[int, bytes]:
    out, at = {}, 0
    while at + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, at)
        if size < 4:
            break
        out[kind & 0x3FFF] = data[at + 4 : at + size]
        at += (size + 3) & ~3
    return out


def _exchange(
    sock: socket.socket, family: int, cmd: int, attrs: bytes, dump: bool = False
) -> list[bytes]:
    """Send one request, return its answers' payloads (generic netlink header included);
    OSError with the kernel's errno."""
    body = struct.pack("=BBH", cmd, 1, 0) + attrs
    flags = _NLM_F_REQUEST | (_NLM_F_DUMP if dump else _NLM_F_ACK)
    sock.send(struct.pack("=IHHII", 16 + len(body), family, flags, 1, 0) + body)
    answers: list[bytes] = []
    while True:
        data = sock.recv(65536)
        at = 0
        while at + 16 <= len(data):
            size, kind = struct.unpack_from("=IH", data, at)
            payload = data[at + 16 : at + size]
            if kind == _NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", payload)
                if code:
                    raise OSError(-code, os.strerror(-code))
                return answers
            if kind == _NLMSG_DONE:
                return answers
            answers.append(payload)
            at += (size + 3) & ~3


def genl_request(family_name: str, command: tuple[int, bytes], dump: bool = False) -> list[bytes]:
    """Run one generic netlink command of `family_name`: the answers' payloads (blocking:
    call it in a thread)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC) as sock:
        sock.settimeout(5.0)
        sock.bind((0, 0))
        (answer,) = _exchange(
            sock,
            _GENL_ID_CTRL,
            _CTRL_CMD_GETFAMILY,
            _nla(_CTRL_ATTR_FAMILY_NAME, family_name.encode() + b"\0"),
        )
        family_id = _attrs(answer[4:]).get(_CTRL_ATTR_FAMILY_ID)
        if family_id is None:
            raise OSError(errno.ENOENT, f"no generic netlink family {family_name}")
        cmd, attrs = command
        return _exchange(sock, struct.unpack("=H", family_id[:2])[0], cmd, attrs, dump)


def backup_daemon_of(answers: list[bytes]) -> tuple[str, int] | None:
    """From the answers to IPVS_CMD_GET_DAEMON: the backup daemon's device and sync id."""
    for payload in answers:
        nested = _attrs(_attrs(payload[4:]).get(_ATTR_DAEMON, b""))
        state, device, syncid = nested.get(1), nested.get(2), nested.get(3)
        if state and struct.unpack_from("=I", state)[0] == DAEMON_BACKUP and device and syncid:
            return device.rstrip(b"\0").decode(), struct.unpack_from("=I", syncid)[0]
    return None


NETLINK_GENERIC = 16
