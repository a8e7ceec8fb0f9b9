"""UDP through `lb run`, userspace and nftables: datagrams at a modest rate, none lost;
and, as Kubernetes' e2e conntrack tests check, a client that keeps sending from one
address and port (one flow) follows its backend's removal or maintenance to another
backend instead of feeding a dead one for as long as it keeps sending. Figures:
datagrams lost, seconds until the flow reaches a live backend."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.reliability.tier import figure, scaled, seen_from
from tests.support.net import UdpBackend, balancer, eventually, free_port
from tests.support.netns import Topology, socket_in
from tests.support.traffic import Backends, admin, config_yaml, running_lb, service_yaml
from tests.test_proxy_udp import Client as UdpClient

pytestmark = pytest.mark.netns

DATAPLANES = [pytest.param("userspace", marks=pytest.mark.topology(vip_on="lo")), "nftables"]


def dns(dataplane: str, backends: list[str]) -> str:
    entries = [f"{{address: {b}:5353}}" for b in backends]
    return config_yaml([service_yaml("dns", 53, entries, "    scheduler: rr\n", "udp")], dataplane)


class Client(asyncio.DatagramProtocol):
    """One flow: a socket bound to one address and port, the answers it gets by sequence
    number (the backend that answered, and when)."""

    def __init__(self) -> None:
        self.answers: dict[int, tuple[str, float]] = {}
        self.peers: set[str] = set()  # where the backends saw the datagrams come from

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        backend, _, payload = data.partition(b" saw ")
        peer, _, seq = payload.partition(b":")
        self.answers[int(seq)] = (backend.decode(), time.monotonic())
        self.peers.add(peer.decode())

    @classmethod
    async def open(
        cls, topo: Topology, source: str, port: int
    ) -> tuple[Client, asyncio.DatagramTransport]:
        sock = socket_in(topo.client, socket.SOCK_DGRAM)
        sock.bind((source, port))
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_datagram_endpoint(cls, sock=sock)
        return client, transport


@pytest.mark.parametrize("dataplane", DATAPLANES)
async def test_datagrams_at_a_modest_rate_are_not_lost(
    topo: Topology, backends: Backends, tmp_path: Path, dataplane: str
) -> None:
    total, rate, flows = scaled(3000), 1000, 10
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(dns(dataplane, ["10.99.2.2", "10.99.2.3", "10.99.2.4"]))
    async with running_lb(topo, cfg):
        clients = [await Client.open(topo, topo.client_ips[i], 40000 + i) for i in range(flows)]
        started = time.monotonic()
        for seq in range(total):
            _, transport = clients[seq % flows]
            transport.sendto(str(seq).encode(), (topo.vip, 53))
            delay = started + (seq + 1) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        sent = time.monotonic() - started
        with contextlib.suppress(AssertionError):  # the stragglers: 5 s at most
            await eventually(lambda: sum(len(c.answers) for c, _ in clients) >= total, 5)
        for _, transport in clients:
            transport.close()
    answered = sum(len(c.answers) for c, _ in clients)
    for i, (client, _) in enumerate(clients):  # the path named carried them
        assert client.peers == {seen_from(dataplane, topo.client_ips[i])}
    figure(
        f"UDP, {dataplane}: {total - answered} of {total:,} datagrams lost "
        f"({total / sent:,.0f}/s over {flows} flows)"
    )
    assert answered == total


async def follow(client: Client, since: int, leaving: str, applied: float) -> float:
    """Wait until the flow's answers (from datagram `since` on) come from another backend
    than `leaving`: the seconds since `applied`; and `leaving` answers nothing after."""
    deadline = time.monotonic() + 15
    while True:
        moved = [
            (seq, t) for seq, (b, t) in client.answers.items() if seq >= since and b != leaving
        ]
        if moved:
            break
        assert time.monotonic() < deadline, f"still at {leaving} 15 s later"
        await asyncio.sleep(0.05)
    first = min(moved)
    late = [seq for seq, (b, t) in client.answers.items() if seq > first[0] and b == leaving]
    assert not late, f"{leaving} answered {len(late)} datagrams after the flow moved"
    return first[1] - applied


@pytest.mark.parametrize("dataplane", DATAPLANES)
async def test_a_flow_leaves_a_removed_or_maintained_backend(
    topo: Topology, backends: Backends, tmp_path: Path, dataplane: str
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(dns(dataplane, ["10.99.2.2"]))
    async with running_lb(topo, cfg) as lb:
        client, transport = await Client.open(topo, topo.client_ips[0], 41000)
        seq = 0
        stop = asyncio.Event()

        async def send() -> None:  # one datagram every 50 ms, from the same address:port
            nonlocal seq
            while not stop.is_set():
                transport.sendto(str(seq).encode(), (topo.vip, 53))
                seq += 1
                await asyncio.sleep(0.05)

        sender = asyncio.get_running_loop().create_task(send())
        await asyncio.sleep(0.5)
        assert {b for b, _ in client.answers.values()} == {"10.99.2.2"}
        # the backend leaves the config (Kubernetes: the pod is deleted)
        n = len(lb.events)
        cfg.write_text(dns(dataplane, ["10.99.2.3", "10.99.2.4"]))
        lb.signal(signal.SIGHUP)
        reloaded = await lb.wait_event("config.reloaded", after=n)
        removed = await follow(client, seq, "10.99.2.2", reloaded["_seen"])
        # the flow's new backend goes into maintenance
        await asyncio.sleep(0.5)
        now = client.answers[max(client.answers)][0]
        edited = time.monotonic()
        await admin(
            topo, lb, "POST", f"/api/v1/services/dns/backends/{now}:5353", {"state": "maint"}
        )
        maintained = await follow(client, seq, now, edited)
        assert client.peers == {seen_from(dataplane, topo.client_ips[0])}
        stop.set()
        await sender
        transport.close()
    figure(
        f"UDP conntrack, {dataplane}: a flow sending every 50 ms reached a live backend "
        f"{removed:.2f}s after its backend was removed and {maintained:.2f}s after the next "
        f"one went into maintenance (bound 10), and the old one answered nothing after"
    )
    assert removed < 10 and maintained < 10


async def test_userspace_flows_leave_removed_down_and_maintained_backends_not_drained() -> None:
    """The same in-process, each state at once: of four flows, the one on a drained
    backend stays; those on a backend in maintenance, DOWN or removed are scheduled again
    with their next datagram."""
    backends = {n: await UdpBackend(n).start() for n in "ABCDE"}
    port = free_port(kind=socket.SOCK_DGRAM)

    def text(states: dict[str, str]) -> str:
        entries = "".join(
            f"      - {{address: '{b.address}', state: {states.get(n, 'ready')}}}\n"
            for n, b in backends.items()
            if states.get(n) != "removed"
        )
        return (
            f"services:\n  - name: dns\n    protocol: udp\n    listen: 127.0.0.1:{port}\n"
            "    scheduler: rr\n    backends:\n" + entries
        )

    async with balancer(text({})) as lb:
        clients = [await UdpClient.open() for _ in range(4)]
        before = [(await c.ask(port))[0][:1].decode() for c in clients]
        assert before == ["E", "D", "C", "B"]  # rr over the kernel's order E D C B A
        await lb.reload(text({"E": "drain", "D": "maint", "B": "removed"}))
        rt = lb.runtime("dns")
        (svc,) = lb.config.services
        down = backends["C"].address
        rt.update(  # C fails its health checks: the controller hands the dataplane this
            dataclasses.replace(
                svc,
                backends=tuple(
                    dataclasses.replace(b, healthy=str(b.address) != down) for b in svc.backends
                ),
            )
        )
        after = [(await c.ask(port))[0][:1].decode() for c in clients]
        for c in clients:
            c.close()
    for b in backends.values():
        b.stop()
    assert after[0] == "E" and "D" not in after[1:] and "C" not in after and "B" not in after
