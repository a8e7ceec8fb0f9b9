"""The PROXY protocol header (lb/proxy_header.py): parsing, encoding, and fuzzing."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.proxy_header import (
    MAX_HEADER,
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    Address,
    ProxyHeader,
    ProxyHeaderError,
    encode,
    parse,
)


def v4(text: str, port: int) -> Address:
    return socket.inet_pton(socket.AF_INET, text), port


def v6(text: str, port: int) -> Address:
    return socket.inet_pton(socket.AF_INET6, text), port


# --- version 1 -----------------------------------------------------------------------------


def test_v1_tcp4_and_the_data_after_it() -> None:
    data = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.0\r\n"
    h = parse(data)
    assert h == ProxyHeader(1, v4("192.0.2.1", 56324), v4("198.51.100.2", 443), 45)
    assert data[h.length :] == b"GET / HTTP/1.0\r\n"


def test_v1_tcp6() -> None:
    h = parse(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n")
    assert h is not None
    assert h.source == v6("2001:db8::1", 1) and h.dest == v6("::1", 65535)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN 1.2.3.4 x y z\r\n"])
def test_v1_unknown_has_no_addresses(line: bytes) -> None:
    assert parse(line + b"data") == ProxyHeader(1, None, None, len(line))


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",  # no header at all
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF without CR
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # a field missing
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",  # two spaces
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # the wrong family
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # a scope
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",  # port out of range
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n",  # a non-ASCII digit
        b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 80,  # no CRLF within 107 bytes
    ],
)
def test_v1_malformed(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_v1_incomplete_until_the_crlf() -> None:
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    for n in range(len(line)):
        assert parse(line[:n]) is None, line[:n]
    assert parse(line) is not None


def test_v1_longest_line_is_accepted_and_one_more_byte_is_not() -> None:
    a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    assert parse(f"PROXY TCP6 {a} {a} 65535 65535\r\n".encode()) is not None  # 104 bytes
    longest = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16) + b"\r\n"
    assert len(longest) == V1_MAX
    assert parse(longest) is not None
    with pytest.raises(ProxyHeaderError):
        parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15) + b"\r\n")


# --- version 2 -----------------------------------------------------------------------------


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([command, family]) + len(body).to_bytes(2, "big") + body


def test_v2_tcp4_with_tlvs_skipped() -> None:
    body = bytes([192, 0, 2, 1, 10, 0, 0, 1]) + (1234).to_bytes(2, "big") + (80).to_bytes(2, "big")
    tlv = b"\x04\x00\x03abc"  # PP2_TYPE_NETNS
    data = v2(0x21, 0x11, body + tlv) + b"rest"
    h = parse(data)
    assert h == ProxyHeader(2, v4("192.0.2.1", 1234), v4("10.0.0.1", 80), len(data) - 4)


def test_v2_tcp6() -> None:
    src, dst = v6("2001:db8::7", 40000), v6("2001:db8::1", 443)
    body = src[0] + dst[0] + (40000).to_bytes(2, "big") + (443).to_bytes(2, "big")
    h = parse(v2(0x21, 0x21, body))
    assert h is not None and (h.source, h.dest) == (src, dst)


@pytest.mark.parametrize(
    "data",
    [
        v2(0x20, 0x00, b""),  # LOCAL: the proxy's own health check
        v2(0x20, 0x11, bytes(12)),  # LOCAL: the family is ignored
        v2(0x20, 0x99, b""),
        v2(0x21, 0x00, b""),  # AF_UNSPEC
        v2(0x21, 0x31, bytes(216)),  # AF_UNIX
    ],
)
def test_v2_without_usable_addresses(data: bytes) -> None:
    h = parse(data)
    assert h is not None and h.source is None and h.dest is None and h.length == len(data)


@pytest.mark.parametrize(
    "data",
    [
        v2(0x11, 0x11, bytes(12)),  # version 1 in a version 2 header
        v2(0x22, 0x11, bytes(12)),  # unknown command
        v2(0x21, 0x13, bytes(12)),  # unknown transport
        v2(0x21, 0x41, bytes(12)),  # unknown family
        v2(0x21, 0x11, bytes(11)),  # IPv4 addresses cut short
        v2(0x21, 0x21, bytes(35)),
        v2(0x21, 0x31, bytes(100)),
        b"\r\n\r\n\x00\r\nQUIX\n" + bytes(4),  # a wrong signature
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # longer than V2_MAX: refused at once
    ],
)
def test_v2_malformed(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_v2_incomplete_until_its_length() -> None:
    data = v2(0x21, 0x11, bytes(12))
    for n in range(len(data)):
        assert parse(data[:n]) is None, n
    assert parse(data) is not None
    assert parse(v2(0x21, 0x11, bytes(V2_MAX - 16))) is not None


# --- encoding ------------------------------------------------------------------------------


def test_encode_v1_as_haproxy_writes_it() -> None:
    assert encode(1, v4("192.0.2.1", 5), v4("10.0.0.1", 80)) == (
        b"PROXY TCP4 192.0.2.1 10.0.0.1 5 80\r\n"
    )
    assert encode(1, v6("::1", 5), v6("2001:db8::1", 80)) == b"PROXY TCP6 ::1 2001:db8::1 5 80\r\n"
    assert encode(1, None, None) == b"PROXY UNKNOWN\r\n"


def test_encode_v2_layout() -> None:
    data = encode(2, v4("192.0.2.1", 5), v4("10.0.0.1", 80))
    assert data[:12] == V2_SIGNATURE
    assert data[12:16] == b"\x21\x11\x00\x0c" and len(data) == 28
    assert encode(2, None, None) == V2_SIGNATURE + b"\x20\x00\x00\x00"


def test_mixed_families_are_sent_ipv4_mapped() -> None:
    line = encode(1, v4("192.0.2.1", 5), v6("2001:db8::1", 80))
    assert line == b"PROXY TCP6 ::ffff:c000:201 2001:db8::1 5 80\r\n"
    h = parse(encode(2, v6("2001:db8::1", 5), v4("192.0.2.1", 80)))
    assert h is not None and h.dest == v6("::ffff:192.0.2.1", 80)


# --- properties and fuzzing ----------------------------------------------------------------

ports = st.integers(0, 65535)
addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(lambda a: a.packed), ports),
    st.tuples(st.ip_addresses(v=6).map(lambda a: a.packed), ports),
)


@given(st.sampled_from([1, 2]), addresses, addresses, st.binary(max_size=64))
def test_round_trip(version: int, source: Address, dest: Address, rest: bytes) -> None:
    data = encode(version, source, dest)
    assert len(data) <= (V1_MAX if version == 1 else V2_MAX)
    h = parse(data + rest)
    assert h is not None
    assert (h.version, h.length) == (version, len(data))
    if len(source[0]) == len(dest[0]):
        assert (h.source, h.dest) == (source, dest)
    else:  # the IPv4 one carried IPv4-mapped
        mapped = [
            a
            if len(a[0]) == 16
            else (ipaddress.IPv6Address(f"::ffff:{ipaddress.ip_address(a[0])}").packed, a[1])
            for a in (source, dest)
        ]
        assert [h.source, h.dest] == mapped
    # any prefix is "more, please", never an error
    for n in range(0, len(data), 3):
        assert parse(data[:n]) is None


def _checked(data: bytes) -> None:
    try:
        h = parse(data)
    except ProxyHeaderError:
        return
    if h is None:
        assert len(data) < MAX_HEADER  # a reader never has to buffer more
    else:
        assert 0 < h.length <= len(data) and h.version in (1, 2)
        for a in (h.source, h.dest):
            assert a is None or (len(a[0]) in (4, 16) and 0 <= a[1] <= 65535)


@settings(max_examples=2000)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_the_parsers_error(data: bytes) -> None:
    _checked(data)


prefixes = st.sampled_from(
    [b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_SIGNATURE]
)


@settings(max_examples=2000)
@given(prefixes, st.binary(max_size=200))
def test_arbitrary_bytes_after_a_valid_start(prefix: bytes, tail: bytes) -> None:
    _checked(prefix + tail)


v1_tokens = st.sampled_from(
    ["PROXY", "TCP4", "TCP6", "UNKNOWN", " ", "\r\n", "\r", "\n", "1.2.3.4", "::1", "65535",
     "0", "65536", "ffff::", "%", "."]
)  # fmt: skip


@settings(max_examples=2000)
@given(st.lists(v1_tokens, max_size=14))
def test_token_soup_of_v1_lines(tokens: list[str]) -> None:
    _checked("".join(tokens).encode())


@settings(max_examples=1000)
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF), st.binary(max_size=300))
def test_arbitrary_v2_headers(command: int, family: int, size: int, body: bytes) -> None:
    data = V2_SIGNATURE + bytes([command, family]) + size.to_bytes(2, "big") + body
    _checked(data)
    try:
        h = parse(data)
    except ProxyHeaderError:
        return
    if h is None:
        assert size > len(body)  # waiting for the rest, which is within the bound
        assert 16 + size <= V2_MAX


def test_encode_refuses_an_unknown_version() -> None:
    with pytest.raises(ValueError, match="version 3"):
        encode(3, None, None)
