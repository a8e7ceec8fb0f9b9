"""`source: transparent`: a TCP service connects to its backends from the client's address.

The backend socket gets IP_TRANSPARENT (IPV6_TRANSPARENT) and is bound to the client's IP
before connect, with IP_BIND_ADDRESS_NO_PORT so that the port is the kernel's ephemeral
pick at connect (unique per 4-tuple, not per address): HAProxy's `source 0.0.0.0 usesrc
clientip`, Envoy's original_src. The backend sees the client's address, as through the
kernel NAT paths; it must route the client's network back through lb, as for those.

The backend's replies are addressed to the client, which is not an address of this host:
policy routing delivers them to lb's socket. An nftables rule marks every TCP packet that
belongs to a transparent socket (one bit, `FWMARK`, or-ed in: other users' bits stay),
and for each family in use an `ip rule` sends marked packets to route table
`ROUTE_TABLE`, which routes everything to `lo` (a `local` default route). lb installs
them when its first transparent service appears, removes a family's when its last one
goes (after the connections of a removed service have ended) and everything at shutdown;
each step is idempotent (a crashed run's leftovers are taken over, `lb cleanup` removes
them). lb's own table `inet lb_transparent` holds the rule, whatever the dataplane: the
nftables dataplane's `ip lb` is rebuilt at will and exists only with that dataplane.

Pure: `wanted_families`, `nft_install`, `nft_remove`, `ip_install`, `ip_remove`. I/O:
`probe` (the privilege, on a throwaway socket), `connect_socket` and `connect` (a backend
socket), `TransparentRouting` (nft and ip, run as commands).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import socket
from collections.abc import Iterable, Sequence

from lb.log import emit
from lb.model import Protocol, Service, ServiceKey, SourceAddress
from lb.proxy.sockets import BindError

log = logging.getLogger("lb.proxy")

Address = tuple[str, int]

#: lb's nftables table for the mark (its own: no other table is touched)
NFT_TABLE = "lb_transparent"
#: the mark bit of packets that belong to a transparent socket
FWMARK = 0x00400000
#: the route table that delivers them locally ("lb" in ASCII), and its rule's priority
ROUTE_TABLE = 27746
RULE_PRIORITY = 100

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)  # not in Python's socket module
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class SourceError(BindError):
    """A service's `source: transparent` cannot be had here: nothing of the apply is done."""

    def __init__(self, key: ServiceKey, service: str, reason: str) -> None:
        self.key = key
        self.service = service
        self.reason = reason
        Exception.__init__(self, f"service {service} ({key}): source: transparent: {reason}")


class RoutingError(Exception):
    """The policy routing could not be installed (or removed); the message says why."""


# --- what the node needs (pure) --------------------------------------------------------------


def is_transparent(s: Service) -> bool:
    return s.source_address is SourceAddress.TRANSPARENT and s.protocol is Protocol.TCP


def wanted_families(services: Iterable[Service]) -> frozenset[int]:
    """The IP versions (4, 6) whose policy routing the transparent services among
    `services` need: their clients are of the listen address's family."""
    return frozenset(s.listen.ip.version for s in services if is_transparent(s))


def nft_install() -> str:
    """The nft script that makes lb's table (again), in one transaction: an existing
    one (a crashed run's) is replaced, never doubled."""
    return (
        f"table inet {NFT_TABLE} {{}}\n"
        f"delete table inet {NFT_TABLE}\n"
        f"table inet {NFT_TABLE} {{\n"
        "  chain divert {\n"
        "    type filter hook prerouting priority mangle; policy accept;\n"
        f"    meta l4proto tcp socket transparent 1 meta mark set meta mark | {FWMARK:#010x}\n"
        "  }\n"
        "}\n"
    )


def nft_remove() -> str:
    """The nft script that deletes lb's table, whether it exists or not."""
    return f"table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n"


#: lb's rule, as `ip rule add` and `ip rule del` take it
RULE = (
    *("fwmark", f"{FWMARK:#x}/{FWMARK:#x}"),
    *("lookup", str(ROUTE_TABLE)),
    *("pref", str(RULE_PRIORITY)),
)


def ip_install(version: int) -> list[list[str]]:
    """The `ip` commands for one family, after `ip_remove(version)`'s rule deletions
    (so that a leftover rule is not doubled): the rule, then the local default route
    (`replace`: idempotent)."""
    default = "0.0.0.0/0" if version == 4 else "::/0"
    route = ("local", default, "dev", "lo", "table", str(ROUTE_TABLE))
    return [
        ["ip", f"-{version}", "rule", "add", *RULE],
        ["ip", f"-{version}", "route", "replace", *route],
    ]


def ip_remove(version: int) -> tuple[list[str], list[str]]:
    """The `ip` commands that remove one family's part: the rule deletion (repeated until
    the kernel says there is none) and the route table's flush."""
    return (
        ["ip", f"-{version}", "rule", "del", *RULE],
        ["ip", f"-{version}", "route", "flush", "table", str(ROUTE_TABLE)],
    )


# --- sockets --------------------------------------------------------------------------------


def _transparent_option(family: int) -> tuple[int, int]:
    if family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, IPV6_TRANSPARENT
    return socket.IPPROTO_IP, IP_TRANSPARENT


def probe(version: int) -> str | None:
    """Why this process cannot make transparent sockets of IP `version`, or None: the
    option tried once on a throwaway socket (it needs CAP_NET_ADMIN or CAP_NET_RAW)."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        return f"cannot make an IPv{version} socket: {e.strerror or e}"
    with sock:
        try:
            sock.setsockopt(*_transparent_option(family), 1)
        except OSError as e:
            name = "IP_TRANSPARENT" if version == 4 else "IPV6_TRANSPARENT"
            if e.errno == errno.EPERM:
                return (
                    f"needs root or CAP_NET_ADMIN (setsockopt {name}: operation not permitted); "
                    "without it set source: proxy"
                )
            return f"setsockopt {name}: {e.strerror or e}"
    return None


def connect_socket(family: int, client_ip: str) -> socket.socket:
    """A non-blocking TCP socket bound to `client_ip` (not an address of this host), the
    port left to connect(): for `connect`, then `loop.create_connection(sock=...)`."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(*_transparent_option(family), 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((client_ip, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():  # the writer may fire again before the waiter runs
        fut.set_result(None)


async def connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: Address) -> None:
    """Connect the non-blocking `sock` to `addr` (an IP address, not a name). Not
    `loop.sock_connect`: uvloop's resolves the address in its thread pool each time (it
    asks getaddrinfo for no socket type, which misses its numeric shortcut): a transparent
    connect cost 2.7 times a plain one that way, 1.4 times this way
    (bench/results/2026-12-07/transparent-source.md)."""
    try:
        sock.connect(addr)
        return
    except BlockingIOError:  # EINPROGRESS: wait until writable, then ask how it went
        pass
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _wake, fut)
    try:
        await fut
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))  # ECONNREFUSED: a ConnectionRefusedError


# --- the node's policy routing (I/O) --------------------------------------------------------


async def _run(cmd: Sequence[str], stdin: str | None = None) -> tuple[int, str]:
    if shutil.which(cmd[0]) is None:
        package = "nftables" if cmd[0] == "nft" else "iproute2"
        return 127, f"{cmd[0]} is not installed (Debian package {package})"
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate(stdin.encode() if stdin is not None else None)
    except OSError as e:  # out of processes or memory: a failure to report, not a crash
        return 126, f"cannot run {cmd[0]}: {e.strerror or e}"
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace").strip()


#: rule deletions tried per family: more than any run would leave behind
MAX_RULE_DELETIONS = 16


async def _delete_rules(version: int) -> tuple[int, str]:
    """Delete lb's rule of a family until there is none: (how many, the last error if it
    was not "none left")."""
    cmd = ip_remove(version)[0]
    for n in range(MAX_RULE_DELETIONS):
        code, out = await _run(cmd)
        if code != 0:
            gone = "No such file or directory" in out or "No such process" in out
            return n, "" if gone else f"{' '.join(cmd)}: {out}"
    return MAX_RULE_DELETIONS, ""


class TransparentRouting:
    """The node's policy routing for transparent sockets, per family: what is installed,
    installed and removed on request. One caller at a time (a lock)."""

    def __init__(self) -> None:
        self.installed: frozenset[int] = frozenset()
        self._lock = asyncio.Lock()

    async def install(self, families: frozenset[int]) -> None:
        """Add what `families` need and is not installed yet; RoutingError if it cannot
        (then what this call added is removed again)."""
        async with self._lock:
            add = families - self.installed
            if not add:
                return
            done: list[int] = []
            try:
                if not self.installed:
                    code, out = await _run(["nft", "-f", "-"], nft_install())
                    if code != 0:
                        raise RoutingError(f"cannot add nftables table inet {NFT_TABLE}: {out}")
                for version in sorted(add):
                    done.append(version)
                    _, error = await _delete_rules(version)  # a leftover is not doubled
                    if error:
                        raise RoutingError(f"cannot set up policy routing: {error}")
                    for cmd in ip_install(version):
                        code, out = await _run(cmd)
                        if code != 0:
                            raise RoutingError(
                                f"cannot set up policy routing: {' '.join(cmd)}: {out}"
                            )
            except RoutingError:
                await self._remove(done, table=not self.installed)
                raise
            self.installed |= add
            emit(
                log,
                logging.INFO,
                "transparent.routing_installed",
                "policy routing for source: transparent installed "
                f"(nftables table inet {NFT_TABLE}, fwmark {FWMARK:#x}, table {ROUTE_TABLE}, "
                f"IPv{' and IPv'.join(str(v) for v in sorted(self.installed))})",
                families=sorted(self.installed),
            )

    async def keep_only(self, families: frozenset[int]) -> None:
        """Remove what `families` do not need; a failure is logged, not raised (what is
        left is harmless: it concerns transparent sockets only; `lb cleanup` removes it)."""
        async with self._lock:
            drop = self.installed - families
            if not drop:
                return
            self.installed -= drop
            errors = await self._remove(sorted(drop), table=not self.installed)
            if errors:
                emit(
                    log,
                    logging.ERROR,
                    "transparent.remove_failed",
                    "cannot remove the policy routing of source: transparent: " + "; ".join(errors),
                )
            else:
                emit(
                    log,
                    logging.INFO,
                    "transparent.routing_removed",
                    "policy routing for source: transparent removed "
                    f"(IPv{' and IPv'.join(str(v) for v in sorted(drop))})"
                    + ("" if self.installed else f", nftables table inet {NFT_TABLE} deleted"),
                    families=sorted(drop),
                )

    async def close(self) -> None:
        await self.keep_only(frozenset())

    @staticmethod
    async def _remove(versions: Iterable[int], table: bool) -> list[str]:
        errors = []
        for version in versions:
            _, error = await _delete_rules(version)
            if error:
                errors.append(error)
            flush = ip_remove(version)[1]
            code, out = await _run(flush)
            if code != 0 and "No such" not in out and "FIB table does not exist" not in out:
                errors.append(f"{' '.join(flush)}: {out}")
        if table:
            code, out = await _run(["nft", "-f", "-"], nft_remove())
            if code != 0:
                errors.append(f"cannot delete nftables table inet {NFT_TABLE}: {out}")
        return errors


async def cleanup() -> list[str]:
    """`lb cleanup`: remove what a run that did not stop (killed) left; what was there."""
    done = []
    code, _ = await _run(["nft", "list", "table", "inet", NFT_TABLE])
    for version in (4, 6):
        removed, _ = await _delete_rules(version)
        await _run(ip_remove(version)[1])
        if removed:
            done.append(
                f"deleted the IPv{version} policy routing of source: transparent "
                f"(fwmark {FWMARK:#x}, table {ROUTE_TABLE})"
            )
    if code == 0:
        await _run(["nft", "-f", "-"], nft_remove())
        done.append(f"deleted nftables table inet {NFT_TABLE}")
    return done
