"""Socket plumbing: binding listeners with clear errors, and resetting connections."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from pathlib import Path

from lb.model import Endpoint, Protocol, ServiceKey

_LINGER_RESET = struct.pack("ii", 1, 0)


class BindError(Exception):
    """A listener could not be bound; the message says why in words, not errno."""

    def __init__(self, key: ServiceKey, service: str, reason: str) -> None:
        self.key = key
        self.service = service
        self.reason = reason
        super().__init__(
            f"cannot listen on {key.protocol} {key.listen} for service {service}: {reason}"
        )


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def explain_bind_error(err: OSError, endpoint: Endpoint) -> str:
    if err.errno == errno.EADDRINUSE:
        return "address already in use"
    if err.errno == errno.EACCES:
        start = _unprivileged_port_start()
        if endpoint.port < start:
            return f"permission denied (ports below {start} need root or CAP_NET_BIND_SERVICE)"
        return "permission denied"
    if err.errno == errno.EADDRNOTAVAIL:
        return f"{endpoint.ip} is not an address of this host"
    return err.strerror or str(err)


def bind_listener(key: ServiceKey, service: str, backlog: int = socket.SOMAXCONN) -> socket.socket:
    """A bound (and for TCP, listening) non-blocking socket for `key`."""
    family = socket.AF_INET if key.listen.family == 4 else socket.AF_INET6
    kind = socket.SOCK_STREAM if key.protocol is Protocol.TCP else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            # Rebind over TIME_WAIT leftovers; a live listener still makes bind() fail.
            # (Not for UDP, where SO_REUSEADDR would let two sockets share the port.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(key.listen.sockaddr())
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise BindError(key, service, explain_bind_error(e, key.listen)) from None
    return sock


def reset(transport: asyncio.BaseTransport) -> None:
    """Close a TCP connection with a RST (SO_LINGER 0) instead of a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    transport.abort()  # type: ignore[attr-defined]
