"""`lb run` in its own network namespace, clients and backends in theirs (needs root)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from offload.netns import inside
from tests.support.netns import Topology, socket_in
from tests.support.proc import LbProcess
from tests.support.traffic import Backends, ask, connects

pytestmark = [
    pytest.mark.netns,
    # six clients, three backends, the VIP on the balancer's loopback
    pytest.mark.topology(
        client_ips=[f"10.99.1.{i}" for i in range(2, 8)],
        backend_ips=["10.99.2.2", "10.99.2.3", "10.99.2.4"],
        vip_on="lo",
    ),
]


async def start_lb(topo: Topology, cfg: Path) -> LbProcess:
    lb = await LbProcess.start(cfg, prefix=["ip", "netns", "exec", topo.lb])
    await lb.wait_event("lb.started")
    return lb


async def test_source_hash_across_namespaces_with_port_mapping(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(
        f"services:\n  - name: web\n    listen: {topo.vip}:80\n    scheduler: sh\n    backends:\n"
        + "".join(f"      - {{address: {ip}:8080}}\n" for ip in topo.backend_ips)
    )
    lb = await start_lb(topo, cfg)
    try:
        order = list(reversed(topo.backend_ips))  # the kernel list: newest first
        for src in topo.client_ips:
            bucket = ((int(ipaddress.IPv4Address(src)) * 0x61C88647) % 2**32) >> 24
            for _ in range(2):
                # the backend answers on 8080 and sees the balancer's address (a proxy)
                assert await ask(topo, src) == f"{order[bucket % 3]} saw 10.99.2.1"
    finally:
        await lb.stop()


async def test_persistence_netmask_groups_a_client_subnet(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(
        f"services:\n  - name: web\n    listen: {topo.vip}:80\n    scheduler: rr\n"
        "    persistence: {timeout: 60s, netmask: 255.255.255.0}\n    backends:\n"
        + "".join(f"      - {{address: {ip}:8080}}\n" for ip in topo.backend_ips)
    )
    lb = await start_lb(topo, cfg)
    try:
        answers = {await ask(topo, src) for src in topo.client_ips for _ in range(2)}
        assert len(answers) == 1  # the whole /24 sticks to one backend
    finally:
        await lb.stop()


class Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def on(cls, sock: socket.socket) -> Datagrams:
        proto = cls()
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: proto, sock=sock)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.inbox.put_nowait((data, addr))

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    async def receive(self) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.inbox.get(), 5)


async def test_udp_through_namespaces_replies_from_the_vip(topo: Topology, tmp_path: Path) -> None:
    bsock = socket_in(topo.backends, socket.SOCK_DGRAM)
    bsock.bind((topo.backend_ips[0], 5353))
    backend = await Datagrams.on(bsock)
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(
        f"services:\n  - name: dns\n    protocol: udp\n    listen: {topo.vip}:53\n    scheduler: rr\n"
        f"    backends: [{{address: {topo.backend_ips[0]}:5353}}]\n"
    )
    lb = await start_lb(topo, cfg)
    try:
        csock = socket_in(topo.client, socket.SOCK_DGRAM)
        csock.bind((topo.client_ips[0], 0))
        client = await Datagrams.on(csock)
        client.send(b"query", (topo.vip, 53))
        data, peer = await backend.receive()
        assert data == b"query" and peer[0] == "10.99.2.1"
        backend.send(b"answer", peer)
        data, source = await client.receive()
        assert data == b"answer" and source == (topo.vip, 53)
        assert client.transport is not None
        client.transport.close()
    finally:
        await lb.stop()
        assert backend.transport is not None
        backend.transport.close()


async def test_host_hold_delays_new_connections_to_one_service_only(topo: Topology) -> None:
    """While an IPVS service is built, Host.hold drops new connections to its VIP:port (the
    client sends its SYN again) and leaves every other port alone; nftables, natively."""
    from lb.model import Endpoint, Protocol, ServiceKey
    from offload.host import NFT_TABLE, Host

    listeners = listening(topo, 80, 81)

    async def connect(port: int, timeout: float) -> None:
        sock = socket_in(topo.client)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (topo.vip, port)), timeout
            )
        finally:
            sock.close()

    host = Host("lbt-none")
    key = ServiceKey(Protocol.TCP, Endpoint(ipaddress.ip_address(topo.vip), 80))
    with inside(topo.lb):  # nft runs in the balancer's namespace
        try:
            async with host.hold(key):
                with pytest.raises(TimeoutError):
                    await connect(80, 0.5)  # held: no answer, not a refusal
                await connect(81, 2)  # another port of the same VIP is not held
                late = asyncio.ensure_future(connect(80, 5))
                await asyncio.sleep(0.3)
            await late  # its SYN, sent again after the hold, gets through
            await connect(80, 2)
        finally:
            subprocess.run(["nft", "delete", "table", "ip", NFT_TABLE], capture_output=True)
    for sock in listeners:
        sock.close()


async def test_host_filter_drops_clients_outside_allowed_sources_before_ipvs(
    topo: Topology,
) -> None:
    """The IPVS dataplane's filter of `allowed_sources`, in the host's table (IPVS cannot
    filter): new connections to the VIP:port from outside the ranges are dropped before
    anything on the host sees them (a listener on the VIP stands in for IPVS, which this
    kernel lacks); inside ones and other ports pass. Kept per service over edits, across
    a rebuild of the table, repaired when the table went, removed with the service."""
    from lb.model import Endpoint, Protocol, ServiceKey
    from offload.host import NFT_TABLE, Host
    from offload.nft_rules import NatPath

    listeners = listening(topo, 80, 81)

    async def served(source: str, port: int = 80) -> bool:
        return await connects(topo, source, port)  # False: dropped, not refused

    def table() -> str:
        return subprocess.run(
            ["nft", "list", "table", "ip", NFT_TABLE], capture_output=True, text=True
        ).stdout

    host = Host("lbt-none")
    key = ServiceKey(Protocol.TCP, Endpoint(ipaddress.ip_address(topo.vip), 80))
    net = ipaddress.ip_network
    with inside(topo.lb):  # nft runs in the balancer's namespace
        try:
            await host.set_filters({key: [net("10.99.1.2/31")]})
            assert await served("10.99.1.2") and await served("10.99.1.3")
            assert not await served("10.99.1.5")
            assert await served("10.99.1.5", port=81)  # another port of the VIP: not filtered
            await host.set_filters({key: [net("10.99.1.4/30")]})  # an edit
            assert await served("10.99.1.5") and not await served("10.99.1.2")
            # the masquerade rebuilds the table whole: the filter is part of it
            await host.set_nat({NatPath(ipaddress.ip_address(topo.vip), Protocol.TCP, key.listen)})
            assert "10.99.1.4/30" in table() and not await served("10.99.1.2")
            subprocess.run(["nft", "delete", "table", "ip", NFT_TABLE], check=True)
            await host.set_filters({key: [net("10.99.1.2/32")]})  # repaired: rebuilt whole
            assert await served("10.99.1.2") and not await served("10.99.1.5")
            await host.set_filters({}, whole=True)  # the service's filter goes
            assert "fw_" not in table() and await served("10.99.1.5")
        finally:
            subprocess.run(["nft", "delete", "table", "ip", NFT_TABLE], capture_output=True)
    for sock in listeners:
        sock.close()


async def test_host_masquerades_only_the_paths_to_backends(
    topo: Topology, backends: Backends
) -> None:
    """The masquerade lb sets up for the kernel path catches a client on the balancer
    itself reaching a backend through the VIP, and nothing else that leaves from the VIP.
    nft's DNAT stands in for IPVS here (this kernel has none)."""
    from lb.config import parse_config
    from offload.host import NFT_TABLE, Host, nat_paths

    (web,) = parse_config(
        f"services: [{{name: web, listen: '{topo.vip}:80', backends: [{{address: '10.99.2.2:8080'}}]}}]"
    ).services

    async def from_vip(port: int) -> str:
        sock = socket_in(topo.lb)
        sock.setblocking(False)
        if port != 80:
            sock.bind((topo.vip, 0))
        target = (topo.vip, 80) if port == 80 else ("10.99.2.3", port)
        await asyncio.get_running_loop().sock_connect(sock, target)
        reader, writer = await asyncio.open_connection(sock=sock)
        line = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
        writer.close()
        return line

    dnat = f"""table ip lbt_dnat {{
    chain out {{
        type nat hook output priority -100; policy accept;
        ip daddr {topo.vip} tcp dport 80 dnat to 10.99.2.2:8080
    }}
}}
"""
    with inside(topo.lb):
        try:
            subprocess.run(["nft", "-f", "-"], input=dnat.encode(), check=True)
            await Host("lbt-none").set_nat(nat_paths([web]))
            # a client on the balancer: its source is the VIP, the backend sees the balancer
            assert await from_vip(80) == "10.99.2.2 saw 10.99.2.1"
            # another packet from the VIP, not to a backend path: left alone
            assert await from_vip(8080) == f"10.99.2.3 saw {topo.vip}"
        finally:
            for table in (NFT_TABLE, "lbt_dnat"):
                subprocess.run(["nft", "delete", "table", "ip", table], capture_output=True)


def listening(topo: Topology, *ports: int) -> list[socket.socket]:
    """Listeners on the VIP in the balancer's namespace, standing in for IPVS's service."""
    out = []
    for port in ports:
        sock = socket_in(topo.lb)
        sock.bind((topo.vip, port))
        sock.listen(16)
        sock.setblocking(False)
        out.append(sock)
    return out


def test_an_ipv6_vip_is_usable_at_once(topo: Topology) -> None:
    """lb's device takes an IPv6 VIP without duplicate address detection: a listener binds
    it at once (with DAD the address stays "tentative" and the bind fails for a second or
    more, so a Service waited for a later sync)."""
    subprocess.run(["ip", "-n", topo.lb, "link", "add", "lbt6", "type", "bridge"], check=True)
    subprocess.run(["ip", "-n", topo.lb, "link", "set", "lbt6", "up"], check=True)
    script = (
        "import asyncio, ipaddress, socket\n"
        "from offload.host import Host\n"
        "vip = ipaddress.ip_address('fd00:99::10')\n"
        "asyncio.run(Host('lbt6').change_vips([vip], []))\n"
        "s = socket.socket(socket.AF_INET6)\n"
        "s.bind((str(vip), 80))\n"
        "print('bound')\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", topo.lb, sys.executable, "-c", script],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "bound" in out.stdout, out.stderr
    shown = subprocess.run(
        ["ip", "-n", topo.lb, "-6", "addr", "show", "dev", "lbt6"], capture_output=True, text=True
    ).stdout
    assert (
        "fd00:99::10/128 scope global nodad" in shown
        and "tentative" not in shown.split("fd00:99::10")[1].split("\n")[0]
    )
