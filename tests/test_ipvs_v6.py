"""IPVS with IPv6 services, without a kernel: the connection table's IPv6 lines and the
sync protocol's IPv6 entries (the kernel tier runs them for real: tests/kernel/)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from lb.model import Endpoint, Protocol, ServiceKey
from offload.ipvs_model import sync_messages
from offload.ipvs_netlink import read_conn_table, read_templates

#: As the kernel prints them (ip_vs_conn_seq_show: `%pI6`, eight groups of four digits)
CLIENT = "fd00:0000:0000:0001:0000:0000:0000:0002"
NETWORK = "fd00:0000:0000:0001:0000:0000:0000:0000"
VIP = "fd00:0000:0000:0000:0000:0000:0000:000a"
BACKEND = "fd00:0000:0000:0002:0000:0000:0000:0002"


def test_ipv6_lines_of_the_connection_table(tmp_path: Path) -> None:
    table = tmp_path / "ip_vs_conn"
    table.write_text(
        "Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\n"
        "TCP 0A630102 9C40 0A63000A 0050 0A630202 1F90 ESTABLISHED     898\n"
        f"TCP {CLIENT} 9C40 {VIP} 0050 {BACKEND} 1F90 ESTABLISHED     897\n"
        f"UDP {CLIENT} D431 {VIP} 0035 {BACKEND} 14E9 UDP             295\n"
        f"TCP {NETWORK} 0000 {VIP} 0050 {BACKEND} 1F90 NONE            100\n"
        "TCP garbage 0000 garbage 0050 garbage 1F90 NONE            100\n"
    )
    conns = read_conn_table(str(table))
    assert conns is not None
    assert [(str(c.client), str(c.vip), str(c.dest), c.state) for c in conns] == [
        ("10.99.1.2:40000", "10.99.0.10:80", "10.99.2.2:8080", "ESTABLISHED"),
        ("[fd00:0:0:1::2]:40000", "[fd00::a]:80", "[fd00:0:0:2::2]:8080", "ESTABLISHED"),
        ("[fd00:0:0:1::2]:54321", "[fd00::a]:53", "[fd00:0:0:2::2]:5353", "UDP"),
    ]
    (template,) = read_templates(str(table)) or []
    assert (template.client.ip, template.vip, template.dest, template.expires) == (
        ipaddress.ip_address("fd00:0:0:1::"),
        Endpoint.parse("[fd00::a]:80"),
        Endpoint.parse("[fd00:0:0:2::2]:8080"),
        100,
    )


def test_ipv6_sync_entries_are_the_kernels_struct_ip_vs_sync_v6() -> None:
    key = ServiceKey(Protocol.TCP, Endpoint.parse("[fd00::a]:80"))
    client = ipaddress.IPv6Address("fd00:0:0:1::")
    backend = Endpoint.parse("[fd00:0:0:2::2]:8080")
    (msg,) = sync_messages(key, [(client, backend, 599.2)], syncid=7)
    assert msg[:8].hex() == "0007" + f"{8 + 72:04x}" + "01010000"  # header: 1 entry, v1
    entry = msg[8:]
    assert len(entry) == 72
    assert entry[:24].hex() == (
        "01" "06" "0048"  # type IPv6, TCP, version 0 and size 72
        "00001000" "0000" "0000" "0050" "1f90"  # template, state, cport 0, vport, dport
        "00000000" "00000258"  # fwmark, 600 s
    )  # fmt: skip
    assert entry[24:] == client.packed + key.listen.ip.packed + backend.ip.packed


def test_ipv6_sync_messages_fit_the_datagram_size() -> None:
    key = ServiceKey(Protocol.UDP, Endpoint.parse("[fd00::a]:53"))
    backend = Endpoint.parse("[fd00:0:0:2::2]:53")
    entries = [(ipaddress.IPv6Address(f"fd00:1::{i + 1:x}"), backend, 1.0) for i in range(41)]
    messages = sync_messages(key, entries)
    assert [m[4] for m in messages] == [20, 20, 1]
    assert max(len(m) for m in messages) == 8 + 72 * 20 <= 1500 - 28  # one MTU's datagram
    assert all(int.from_bytes(m[2:4], "big") == len(m) for m in messages)
