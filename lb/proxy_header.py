"""The PROXY protocol header (HAProxy's, versions 1 and 2): parsing and encoding.

Pure code: bytes in, bytes out. The userspace TCP relay (lb/proxy/tcp.py) sends a header
to a backend before the client's first byte (`proxy_protocol: v1 | v2`, as HAProxy's
`send-proxy` / `send-proxy-v2`) and reads one from each client first
(`accept_proxy_protocol`, as HAProxy's `accept-proxy`, either version).

Addresses are packed (4 or 16 bytes, as `socket.inet_pton` gives them) with the port
beside them: the form the scheduling core takes.

Specification: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

#: The 12 bytes that open a version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: The longest version 1 line, CRLF included (the specification's bound).
V1_MAX = 107
#: The longest version 2 header lb accepts, TLVs included (the format allows 16 + 65535;
#: HAProxy takes what fits its buffer). AWS and Azure TLVs are well under this.
V2_MAX = 4096
#: What a reader may need to buffer before it knows: the longer of the two bounds.
MAX_HEADER = max(V1_MAX, V2_MAX)

_V2_FIXED = struct.Struct("!12sBBH")  # signature, version+command, family+transport, length
_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")
_LOCAL, _PROXY = 0x20, 0x21  # version 2 with command LOCAL / PROXY
#: family+transport bytes with an address lb uses: TCP or UDP over IPv4 / IPv6
_INET = (0x11, 0x12)
_INET6 = (0x21, 0x22)
#: the others the specification defines: UNSPEC, UNIX stream / datagram (addresses ignored)
_NO_ADDRESS = (0x00, 0x31, 0x32)
_UNIX_LEN = 216
_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96, IPv4-mapped IPv6

Address = tuple[bytes, int]  # packed IP, port


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header (or do not start with one)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. `source` / `dest` are None for `PROXY UNKNOWN`, a version 2
    LOCAL command (a health check from the proxy itself) or a family without IP addresses
    (AF_UNIX, AF_UNSPEC): the receiver then uses the connection's own addresses."""

    version: int  # 1 or 2
    source: Address | None
    dest: Address | None
    length: int  # bytes the header took; what follows is the client's data


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`; None while `data` is a valid but incomplete
    beginning of one (read more and call again). Raises ProxyHeaderError, and nothing
    else, for anything that cannot become a valid header, as soon as it knows: a reader
    never needs more than MAX_HEADER bytes to decide."""
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if not data:
        return None
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    head = data[:V1_MAX]
    if not head.startswith(V1_PREFIX):
        if V1_PREFIX.startswith(head):
            return None
        raise ProxyHeaderError("no PROXY protocol header")
    end = head.find(b"\n")
    if end < 0:
        if len(head) >= V1_MAX:
            raise ProxyHeaderError(f"version 1 header longer than {V1_MAX} bytes")
        if b"\r" in head[:-1]:
            raise ProxyHeaderError("version 1 header with a CR inside the line")
        return None
    if head[end - 1 : end] != b"\r" or b"\r" in head[: end - 1]:
        raise ProxyHeaderError("version 1 header not ended by CRLF")
    length = end + 1
    try:
        line = head[len(V1_PREFIX) : end - 1].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("version 1 header with non-ASCII bytes") from None
    if line == "UNKNOWN" or line.startswith(
        "UNKNOWN "
    ):  # the rest of the line is ignored (specification)
        return ProxyHeader(1, None, None, length)
    fields = line.split(" ")
    if len(fields) != 5:
        raise ProxyHeaderError("version 1 header: not PROTO SRC DST SPORT DPORT")
    proto, src, dst, sport, dport = fields
    if proto == "TCP4":
        version = 4
    elif proto == "TCP6":
        version = 6
    else:
        raise ProxyHeaderError(f"version 1 header: unknown protocol {proto[:8]!r}")
    return ProxyHeader(
        1, (_ip(src, version), _port(sport)), (_ip(dst, version), _port(dport)), length
    )


def _ip(text: str, version: int) -> bytes:
    if "%" in text:  # a scope id: ipaddress takes it, the protocol does not
        raise ProxyHeaderError("version 1 header: an address with a scope")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"version 1 header: {text[:48]!r} is not an address") from None
    if ip.version != version:
        raise ProxyHeaderError(f"version 1 header: {text!r} is not an IPv{version} address")
    return ip.packed


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or text != str(int(text)):
        raise ProxyHeaderError(f"version 1 header: {text[:8]!r} is not a port")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"version 1 header: port {port} is out of range")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _V2_FIXED.size:
        if V2_SIGNATURE.startswith(data[:12]):
            return None
        raise ProxyHeaderError("no PROXY protocol header")
    signature, command, family, size = _V2_FIXED.unpack_from(data)
    if signature != V2_SIGNATURE:
        raise ProxyHeaderError("no PROXY protocol header")
    if command not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"version 2 header: unknown version/command {command:#04x}")
    length = _V2_FIXED.size + size
    if length > V2_MAX:
        raise ProxyHeaderError(f"version 2 header of {length} bytes (at most {V2_MAX})")
    if command == _PROXY and family not in _INET + _INET6 + _NO_ADDRESS:
        raise ProxyHeaderError(f"version 2 header: unknown family/transport {family:#04x}")
    if len(data) < length:
        return None
    if command == _LOCAL:  # the family and addresses are to be ignored
        return ProxyHeader(2, None, None, length)
    at = _V2_FIXED.size
    if family in _INET:
        if size < _V2_INET.size:
            raise ProxyHeaderError("version 2 header: IPv4 addresses cut short")
        src, dst, sport, dport = _V2_INET.unpack_from(data, at)
        return ProxyHeader(2, (src, sport), (dst, dport), length)
    if family in _INET6:
        if size < _V2_INET6.size:
            raise ProxyHeaderError("version 2 header: IPv6 addresses cut short")
        src, dst, sport, dport = _V2_INET6.unpack_from(data, at)
        return ProxyHeader(2, (src, sport), (dst, dport), length)
    if family != 0x00 and size < _UNIX_LEN:
        raise ProxyHeaderError("version 2 header: UNIX addresses cut short")
    return ProxyHeader(2, None, None, length)


def _same_family(source: Address, dest: Address) -> tuple[Address, Address]:
    """Both as IPv6 (IPv4-mapped) when one of them is: a header has one family."""
    if len(source[0]) == len(dest[0]):
        return source, dest
    if len(source[0]) == 4:
        return (_MAPPED + source[0], source[1]), dest
    return source, (_MAPPED + dest[0], dest[1])


def encode(version: int, source: Address | None, dest: Address | None) -> bytes:
    """The header (version 1 or 2) saying the connection came from `source` to `dest`;
    without both, `PROXY UNKNOWN` (v1) or a LOCAL command (v2): the receiver then uses the
    connection's own addresses. An IPv4 address beside an IPv6 one is sent IPv4-mapped."""
    if version not in (1, 2):
        raise ValueError(f"PROXY protocol version {version} (1 or 2)")
    if source is None or dest is None:
        if version == 1:
            return b"PROXY UNKNOWN\r\n"
        return _V2_FIXED.pack(V2_SIGNATURE, _LOCAL, 0x00, 0)
    (src, sport), (dst, dport) = _same_family(source, dest)
    inet6 = len(src) == 16
    if version == 1:
        return (
            f"PROXY {'TCP6' if inet6 else 'TCP4'} {ipaddress.ip_address(src)}"
            f" {ipaddress.ip_address(dst)} {sport} {dport}\r\n"
        ).encode("ascii")
    body = (_V2_INET6 if inet6 else _V2_INET).pack(src, dst, sport, dport)
    return _V2_FIXED.pack(V2_SIGNATURE, _PROXY, 0x21 if inet6 else 0x11, len(body)) + body
