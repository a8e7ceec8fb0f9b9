"""Socket plumbing of the userspace proxy on real sockets: listeners bound with errors in
words, and connections closed with a reset."""

from __future__ import annotations

import asyncio
import errno
import socket
from pathlib import Path

import pytest

from lb.model import Endpoint, Protocol, ServiceKey
from lb.proxy.sockets import BindError, bind_listener, explain_bind_error, reset
from tests.support.net import free_port


def key(protocol: Protocol, address: str) -> ServiceKey:
    return ServiceKey(protocol, Endpoint.parse(address))


def test_a_tcp_listener_is_listening_non_blocking_and_reuses_time_wait() -> None:
    port = free_port()
    with bind_listener(key(Protocol.TCP, f"127.0.0.1:{port}"), "web") as sock:
        assert sock.getsockname() == ("127.0.0.1", port)
        assert sock.type == socket.SOCK_STREAM and sock.family == socket.AF_INET
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the kernel completed the handshake: it listens


def test_a_udp_listener_is_bound_without_sharing_its_port() -> None:
    port = free_port(kind=socket.SOCK_DGRAM)
    with bind_listener(key(Protocol.UDP, f"127.0.0.1:{port}"), "dns") as sock:
        assert sock.getsockname() == ("127.0.0.1", port)
        assert sock.type == socket.SOCK_DGRAM and sock.getblocking() is False
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"ping", ("127.0.0.1", port))
            sock.settimeout(2)
            assert sock.recvfrom(16)[0] == b"ping"


def test_an_ipv6_listener_is_v6_only() -> None:
    port = free_port("::1")
    with bind_listener(key(Protocol.TCP, f"[::1]:{port}"), "web6") as sock:
        assert sock.family == socket.AF_INET6
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


@pytest.mark.parametrize("protocol", [Protocol.TCP, Protocol.UDP])
def test_a_port_in_use_is_a_bind_error_in_words(protocol: Protocol) -> None:
    kind = socket.SOCK_STREAM if protocol is Protocol.TCP else socket.SOCK_DGRAM
    port = free_port(kind=kind)
    k = key(protocol, f"127.0.0.1:{port}")
    with bind_listener(k, "first"), pytest.raises(BindError) as caught:
        bind_listener(k, "second")
    e = caught.value
    assert (e.key, e.service, e.reason) == (k, "second", "address already in use")
    assert str(e) == (
        f"cannot listen on {protocol} 127.0.0.1:{port} for service second: address already in use"
    )
    assert e.__cause__ is None and e.__suppress_context__  # no errno chained in the message


def test_an_address_not_on_this_host_is_named() -> None:
    if Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() != "0":
        pytest.skip("ip_nonlocal_bind lets any address be bound here")
    with pytest.raises(BindError) as caught:
        bind_listener(key(Protocol.TCP, "192.0.2.1:8080"), "web")  # TEST-NET-1
    assert caught.value.reason == "192.0.2.1 is not an address of this host"


def _unprivileged_port_start() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())


def test_permission_denied_says_what_a_low_port_needs() -> None:
    start = _unprivileged_port_start()
    denied = OSError(errno.EACCES, "Permission denied")
    if start > 1:
        low = Endpoint.parse(f"10.0.0.1:{start - 1}")
        assert explain_bind_error(denied, low) == (
            f"permission denied (ports below {start} need root or CAP_NET_BIND_SERVICE)"
        )
    high = Endpoint.parse(f"10.0.0.1:{max(start, 1)}")
    assert explain_bind_error(denied, high) == "permission denied"


def test_other_errors_keep_their_strerror() -> None:
    at = Endpoint.parse("10.0.0.1:80")
    assert explain_bind_error(OSError(errno.ENOBUFS, "No buffer space available"), at) == (
        "No buffer space available"
    )
    assert explain_bind_error(OSError("no errno at all"), at) == "no errno at all"


async def _peer_sees(close: str) -> bytes | type[BaseException]:
    """Connect to a loopback server, close the client side by `close`, and return what the
    server's read then gets: b"" for a FIN, the exception for a RST."""
    seen: asyncio.Future[bytes | type[BaseException]] = asyncio.Future()
    accepted = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.set()
        try:
            seen.set_result(await r.read(100))
        except OSError as e:
            seen.set_result(type(e))
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(accepted.wait(), 2)
        if close == "reset":
            reset(writer.transport)
        else:
            writer.close()
        return await asyncio.wait_for(seen, 2)
    finally:
        server.close()
        await server.wait_closed()


async def test_reset_closes_with_a_rst_where_close_sends_a_fin() -> None:
    assert await _peer_sees("close") == b""  # the control: an orderly FIN is an empty read
    assert await _peer_sees("reset") is ConnectionResetError
