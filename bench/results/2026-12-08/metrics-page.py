"""/metrics at N services x 10 backends (issue 17): `lb run`'s Daemon, userspace dataplane,
started in-process in a network namespace of its own (as memory-profile.py of 2026-12-07),
then lb's /metrics page built as the admin API builds it (`Metrics.page()`), without and
with per-backend series (`admin.backend_metrics`): its size, its wall and CPU time, and
the longest the event loop waited meanwhile (a task beside it that only yields, timing
the gaps between its turns). A full collection first, so that no earlier garbage is
counted.

    ip netns add lbmetrics && ip netns exec lbmetrics ip link set lo up
    ip netns exec lbmetrics ip route add local 10.100.0.0/16 dev lo
    ip netns exec lbmetrics .venv/bin/python bench/results/2026-12-08/metrics-page.py 10000

(the venv's python from the repository root; the hard descriptor limit must exceed N)."""

from __future__ import annotations

import asyncio
import gc
import sys
import tempfile
import time
from pathlib import Path

from bench.scale import config
from lb import daemon


async def beside(gaps: list[float]) -> None:
    """Yield, forever, noting the time between turns."""
    loop = asyncio.get_running_loop()
    last = loop.time()
    while True:
        await asyncio.sleep(0)
        now = loop.time()
        gaps.append(now - last)
        last = now


async def measure(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lb.yaml"
        path.write_text(config(n))
        d = daemon.Daemon(path, None, "userspace")
        run = asyncio.get_running_loop().create_task(d.run())
        while not d._serving:  # noqa: ASYNC110 (the Daemon offers nothing to wait on)
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        loop = asyncio.get_running_loop()
        for backends in (False, True, False, True):
            d.metrics.backends = backends
            gc.collect()
            gaps: list[float] = []
            task = loop.create_task(beside(gaps))
            await asyncio.sleep(0)
            wall, cpu = time.perf_counter(), time.process_time()
            parts = await d.metrics.page()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            task.cancel()
            size = sum(map(len, parts))
            print(
                f"{n} services x 10 backends, backend_metrics {str(backends).lower()}: "
                f"{size / 1e6:.1f} MB ({size / n:.0f} B a service), {wall:.2f} s "
                f"({cpu:.2f} s CPU), the loop turned {len(gaps)} times, longest wait "
                f"{max(gaps) * 1000:.0f} ms"
            )
        d._stop.set()
        await run


def main() -> None:
    with asyncio.Runner(loop_factory=daemon.loop_factory()) as runner:
        runner.run(measure(int(sys.argv[1])))


if __name__ == "__main__":
    main()
