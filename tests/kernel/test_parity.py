"""Parity: one scenario (same backends, weights, history of adds, edits and removals, same
client addresses and ports) run through the userspace dataplane and through kernel IPVS
must pick the same backends, connection for connection. This is what makes the userspace
path the reference for the kernel one."""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
from pathlib import Path

from tests.support.netns import Topology, ipvsadm, run_in
from tests.support.proc import LbProcess
from tests.support.traffic import (
    Backends,
    admin,
    client_conn,
    config_yaml,
    running_lb,
    service_yaml,
)

A, B, C, D = (f"10.99.2.{i}:8080" for i in (2, 3, 4, 5))

#: The history every service goes through: (address, weight, state) per step, file order.
STEPS: list[list[tuple[str, int, str]]] = [
    [(A, 2, "ready")],
    [(A, 2, "ready"), (B, 3, "ready")],
    [(A, 2, "ready"), (B, 3, "ready"), (C, 1, "ready")],
    [(A, 2, "ready"), (B, 1, "ready"), (C, 1, "ready")],  # an edit
    [(A, 4, "ready"), (B, 2, "ready"), (C, 6, "ready")],  # edits to a common divisor (wrr di=2)
    [(B, 2, "ready"), (C, 6, "ready"), (D, 4, "ready")],  # A leaves (quiesced: it has
    # connections, then deleted once they are gone: see LINGER) and D comes
    [(B, 2, "ready"), (C, 6, "drain"), (D, 4, "ready")],  # a drain (weight 0)
]
#: Clients end their connections with a reset, so that closed connections count as inactive
#: for the CLOSE timeout (10 s) rather than TIME_WAIT (120 s), in userspace and in the kernel
#: alike. After step 5 the test waits until A is deleted in both (LINGER at most).
LINGER = 90.0
WAIT_AFTER = {5}

#: port -> (scheduler, flags); clients per step: the round robins from one address, the
#: hashes from many.
SERVICES = {
    81: ("rr", ""),
    82: ("wrr", ""),
    83: ("sh", ""),
    84: ("sh", "    scheduler_flags: [sh-port]\n"),
    85: ("mh", ""),
    86: ("mh", "    scheduler_flags: [mh-port]\n"),
    87: ("dh", ""),
}


def config(step: int, dataplane: str) -> str:
    services = []
    for port, (sched, flags) in SERVICES.items():
        backends = [f"{{address: {addr}, weight: {w}, state: {st}}}" for addr, w, st in STEPS[step]]
        services.append(
            service_yaml(
                f"{sched}{port}", port, backends, f"    scheduler: {sched}\n    retries: 0\n{flags}"
            )
        )
    return config_yaml(services, dataplane)


async def pick(topo: Topology, source: str, port: int, sport: int) -> str:
    """The backend this connection reached ("-": none), then a reset to end it."""
    try:
        reader, writer = await client_conn(topo, source, port, sport)
    except ConnectionRefusedError:
        return "-"  # IPVS with no usable destination answers ICMP port unreachable
    except ConnectionResetError:
        return "-"  # the userspace proxy's reset (below) came before the connect was seen
    try:
        line = (await asyncio.wait_for(reader.readline(), 10)).decode()
    except ConnectionResetError:
        line = ""  # the userspace proxy with no usable backend resets the client
    sock = writer.get_extra_info("socket")
    if sock is not None:  # (None: already reset)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()
    return line.split()[0] if line else "-"


async def gone(topo: Topology, lb: LbProcess, backend: str) -> None:
    """Until no service lists `backend` (quiesced backends are listed until deleted)."""
    while True:
        answer = await admin(topo, lb, "GET", "/api/v1/services")
        if all(b["address"] != backend for s in answer["services"] for b in s["backends"]):
            return
        await asyncio.sleep(0.5)


async def run_scenario(
    topo: Topology, cfg: Path, dataplane: str
) -> tuple[dict[int, list[str]], list[str]]:
    """The picks per port, and what lb warned of meanwhile (to explain a difference)."""
    picks: dict[int, list[str]] = {port: [] for port in SERVICES}
    ports = itertools.count(20000)  # every connection its own source port, the same in both runs
    cfg.write_text(config(0, dataplane))
    async with running_lb(topo, cfg) as lb:
        for step in range(len(STEPS)):
            if step:
                n = len(lb.events)
                cfg.write_text(config(step, dataplane))
                lb.signal(signal.SIGHUP)
                await lb.wait_event("config.reloaded", after=n)
            if step in WAIT_AFTER:  # the leaver's connections expire: it is deleted
                await asyncio.wait_for(gone(topo, lb, A), LINGER)
            for port, (sched, _) in SERVICES.items():
                sources = (
                    [topo.client_ips[0]] * 10 if sched in ("rr", "wrr") else topo.client_ips[:24]
                )
                for src in sources:
                    picks[port].append(await pick(topo, src, port, next(ports)))
        if dataplane == "ipvs":
            listing = ipvsadm(topo)
            assert "Masq" in listing and "10.99.2.2:8080" not in listing  # A was deleted
        warned = [
            f"{e.get('event')}: {e.get('msg')}"
            for e in lb.events
            if e.get("level") in ("warning", "error")
        ]
    return picks, warned


async def test_userspace_and_ipvs_pick_the_same_backends(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    run_in(topo, "ip", "link", "add", "vip0", "type", "dummy")
    run_in(topo, "ip", "addr", "add", f"{topo.vip}/32", "dev", "vip0")
    run_in(topo, "ip", "link", "set", "vip0", "up")
    userspace, u_warned = await run_scenario(topo, cfg, "userspace")
    run_in(topo, "ip", "link", "del", "vip0")  # lb holds the VIP itself in ipvs mode
    kernel, k_warned = await run_scenario(topo, cfg, "ipvs")
    for port, (sched, flags) in SERVICES.items():
        label = f"{sched}{' ' + flags.strip() if flags else ''}"
        assert len(set(userspace[port])) > 1 or sched == "dh", f"{label}: the scenario must spread"
        assert userspace[port] == kernel[port], (
            f"{label}: userspace and IPVS differ\nuserspace {userspace[port]}\n"
            f"ipvs      {kernel[port]}\nlb warned (userspace): {u_warned}\n"
            f"lb warned (ipvs): {k_warned}"
        )
