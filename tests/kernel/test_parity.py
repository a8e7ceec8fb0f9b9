"""Parity: one scenario (same backends, weights, history of adds, edits and removals, same
client addresses and ports) run through the userspace dataplane and through kernel IPVS
must pick the same backends, connection for connection. This is what makes the userspace
path the reference for the kernel one."""

from __future__ import annotations

import itertools
import signal
from pathlib import Path

from tests.kernel.conftest import (
    Backends,
    ask,
    config_yaml,
    ipvsadm,
    run_in,
    running_lb,
    service_yaml,
)
from tests.netns import Topology

A, B, C, D = (f"10.99.2.{i}:8080" for i in (2, 3, 4, 5))

#: The history every service goes through: (address, weight, state) per step, file order.
STEPS: list[list[tuple[str, int, str]]] = [
    [(A, 2, "ready")],
    [(A, 2, "ready"), (B, 3, "ready")],
    [(A, 2, "ready"), (B, 3, "ready"), (C, 1, "ready")],
    [(A, 2, "ready"), (B, 1, "ready"), (C, 1, "ready")],  # an edit
    [(B, 1, "ready"), (C, 1, "ready"), (D, 4, "ready")],  # a removal and an add
    [(B, 1, "ready"), (C, 1, "drain"), (D, 4, "ready")],  # a drain (weight 0)
]

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


async def run_scenario(topo: Topology, cfg: Path, dataplane: str) -> dict[int, list[str]]:
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
            for port, (sched, _) in SERVICES.items():
                sources = (
                    [topo.client_ips[0]] * 10 if sched in ("rr", "wrr") else topo.client_ips[:24]
                )
                for src in sources:
                    try:
                        answer = (await ask(topo, src, port, next(ports))).split()[0]
                    except (ConnectionRefusedError, ConnectionResetError):
                        # no usable backend: userspace resets the client, IPVS answers
                        # with ICMP port unreachable; either way this client got none
                        answer = "-"
                    picks[port].append(answer)
        if dataplane == "ipvs":
            assert "Masq" in ipvsadm(topo)
    return picks


async def test_userspace_and_ipvs_pick_the_same_backends(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    run_in(topo, "ip", "link", "add", "vip0", "type", "dummy")
    run_in(topo, "ip", "addr", "add", f"{topo.vip}/32", "dev", "vip0")
    run_in(topo, "ip", "link", "set", "vip0", "up")
    userspace = await run_scenario(topo, cfg, "userspace")
    run_in(topo, "ip", "link", "del", "vip0")  # lb holds the VIP itself in ipvs mode
    kernel = await run_scenario(topo, cfg, "ipvs")
    for port, (sched, flags) in SERVICES.items():
        label = f"{sched}{' ' + flags.strip() if flags else ''}"
        assert len(set(userspace[port])) > 1 or sched == "dh", f"{label}: the scenario must spread"
        assert userspace[port] == kernel[port], (
            f"{label}: userspace and IPVS differ\nuserspace {userspace[port]}\nipvs      {kernel[port]}"
        )
