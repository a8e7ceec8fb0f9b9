"""kill -9 at any point of start-up leaves the kernel in a state the next start adopts:
lb on nftables is killed while it starts, at several points (while Python imports, and
as soon as each of its start-up events is out), then started again. Figure: restarts
whose ruleset is the very one a clean start leaves, and that serve through the kernel."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

import pytest

from tests.reliability.tier import SCALE, figure
from tests.support.net import eventually
from tests.support.netns import Topology, run_in
from tests.support.proc import LbProcess
from tests.support.traffic import START, Backends, ask, config_yaml, running_lb, service_yaml

pytestmark = pytest.mark.netns


def ruleset(topo: Topology) -> str:
    """lb's tables (the only ones in the balancer's namespace), without counter values."""
    return run_in(topo, "nft", "-s", "list", "ruleset")


def out(lb: LbProcess, k: int) -> bool:
    """lb's k-th start-up event is out."""
    return len(lb.events) > k


def lb_config() -> str:
    """Two services the kernel can carry (rr, no retries), TCP and UDP."""
    backends = ["{address: 10.99.2.2:8080}", "{address: 10.99.2.3:8080}"]
    web = service_yaml("web", 80, backends, "    scheduler: rr\n    retries: 0\n")
    dns = service_yaml("dns", 53, ["{address: 10.99.2.2:5353}"], "    scheduler: rr\n", "udp")
    return config_yaml([web, dns], "nftables")


async def test_kill_9_during_start_up_then_a_restart_adopts_the_ruleset(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(lb_config())
    began = time.monotonic()
    async with running_lb(topo, cfg) as lb:  # a clean start: the reference
        took = time.monotonic() - began
        clean = ruleset(topo)
        assert "10.99.0.10 . tcp . 80" in clean and "10.99.0.10 . udp . 53" in clean, clean
        names = [e["event"] for e in lb.events]
        events = names[: names.index("lb.started")]
    # killed as soon as each start-up event is out, and at moments of a start's duration
    fractions = [0.9] if SCALE <= 1 else [i / (10 * SCALE) for i in range(1, int(10 * SCALE))]
    points: list[tuple[str, float | int]] = [(f"{f * took:.2f}s in", f * took) for f in fractions]
    points += [(f"after {name}", k) for k, name in enumerate(events) if name not in events[:k]]
    adopted = []
    for name, at in points:
        lb = await LbProcess.start(cfg, prefix=["ip", "netns", "exec", topo.lb])
        if isinstance(at, float):
            await asyncio.sleep(at)
        else:
            await eventually(functools.partial(out, lb, at), timeout=START, interval=0.001)
        await lb.stop()  # SIGKILL
        async with running_lb(topo, cfg):
            same = ruleset(topo) == clean
            served = (await ask(topo, topo.client_ips[0])).endswith(f"saw {topo.client_ips[0]}")
            adopted.append((name, same, served))
    good = [name for name, same, served in adopted if same and served]
    figure(
        f"kill -9 during start-up, nftables: {len(good)} of {len(points)} restarts (killed "
        f"{', '.join(n for n, _ in points)}) served through the kernel with the ruleset a "
        f"clean start leaves; a clean start takes {took:.1f}s"
    )
    assert len(good) == len(points), adopted
