"""Reloads under load, as HAProxy's seamless-reload reg-tests run them: clients open
connection after connection and a long-lived one keeps talking while lb reloads again
and again (weights, scheduler, a backend added and removed, and every fifth file invalid: an alias bomb, a 20 MB file with a problem on every line,
a NaN for a duration).
Figure: connections failed (none), bytes of the long-lived connection lost (none)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.reliability.tier import figure, problem_file, scaled
from tests.support.netns import Topology
from tests.support.traffic import Backends, Load, Stream, config_yaml, running_lb, service_yaml
from tests.test_hostile_config import alias_bomb

pytestmark = pytest.mark.netns

#: userspace binds the VIP, so it must be on the balancer (nftables puts it on lb0 itself)
DATAPLANES = [pytest.param("userspace", marks=pytest.mark.topology(vip_on="lo")), "nftables"]
#: invalid files, in turn (None: 20 MB with a problem on every line)
INVALID = [alias_bomb(9), None, "shutdown_grace: .nan\nservices: []\n"]


def config(dataplane: str, step: int) -> str:
    """The step-th config of the cycle: weights, scheduler and the backend list change."""
    ips = ["10.99.2.2", "10.99.2.3", "10.99.2.4"] + (["10.99.2.5"] if step % 3 == 1 else [])
    backends = [f"{{address: {ip}:8080, weight: {1 + (step + i) % 3}}}" for i, ip in enumerate(ips)]
    scheduler = ("wrr", "rr")[step % 2]
    web = service_yaml("web", 80, backends, f"    scheduler: {scheduler}\n    retries: 0\n")
    return config_yaml([web], dataplane)


@pytest.mark.parametrize("dataplane", DATAPLANES)
async def test_no_connection_fails_during_reloads(
    topo: Topology, backends: Backends, tmp_path: Path, dataplane: str
) -> None:
    reloads = scaled(20)
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config(dataplane, 0))
    async with running_lb(topo, cfg) as lb:
        load = Load(topo, workers=3)
        load.start()
        stream = Stream(topo, topo.client_ips[10])
        stream.start()
        invalid = 0
        for step in range(1, reloads + 1):
            n = len(lb.events)
            if step % 5 == 0:  # an invalid file: refused, the running config serves on
                bad = INVALID[invalid % len(INVALID)]
                if bad is None:
                    problem_file(cfg, 436_906)
                else:
                    cfg.write_text(bad)
                lb.signal(signal.SIGHUP)
                await lb.wait_event("config.reload_rejected", after=n)
                invalid += 1
                continue
            cfg.write_text(config(dataplane, step))
            lb.signal(signal.SIGHUP)
            await lb.wait_event("config.reloaded", after=n)
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        await stream.stop()
        await load.stop()
    total = load.ok + len(load.failed)
    figure(
        f"reloads under load, {dataplane}: {len(load.failed)} of {total:,} connections failed "
        f"during {reloads} reloads ({invalid} of them invalid files); a connection open "
        f"throughout carried {stream.received:,} of {stream.sent:,} bytes back intact"
    )
    assert load.failed == [], "\n".join(load.failed[:5]) + "\n" + lb.timeline(load.started)
    assert load.ok >= 50
    assert set(load.paths) == {"userspace" if dataplane == "userspace" else "kernel"}
    assert stream.error is None and stream.sent == stream.received > 0
