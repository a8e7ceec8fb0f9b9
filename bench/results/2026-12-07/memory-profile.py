"""Where lb's memory goes at N services x 10 backends (issue 17): `lb run`'s Daemon,
userspace dataplane, started in-process in a network namespace of its own, then its RSS
and, with --trace, tracemalloc's largest allocation sites per service.

    ip netns add lbmem && ip netns exec lbmem ip link set lo up
    ip netns exec lbmem ip route add local 10.100.0.0/16 dev lo
    ip netns exec lbmem .venv/bin/python bench/results/2026-12-07/memory-profile.py 10000 [--trace]

(the venv's python from the repository root; the namespace gives the listeners their
VIPs, the hard descriptor limit must exceed N)."""

from __future__ import annotations

import asyncio
import gc
import sys
import tempfile
import tracemalloc
from pathlib import Path

from bench.scale import config
from lb import daemon


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


async def profile(n: int, trace: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lb.yaml"
        path.write_text(config(n))
        d = daemon.Daemon(path, None, "userspace")
        if trace:
            tracemalloc.start(1)
        run = asyncio.get_running_loop().create_task(d.run())
        while not d._serving:  # noqa: ASYNC110 (the Daemon offers nothing to wait on)
            await asyncio.sleep(0.1)
        await asyncio.sleep(3)
        gc.collect()
        print(f"{n} services x 10 backends: RSS {rss_mb():.1f} MB")
        if trace:
            for st in tracemalloc.take_snapshot().statistics("lineno")[:25]:
                frame = st.traceback[0]
                where = frame.filename.rsplit("/site-packages/", 1)[-1].replace(
                    str(Path.cwd()) + "/", ""
                )
                print(
                    f"{st.size / 1e6:6.2f} MB {st.count:8,d} allocations "
                    f"{st.size / n:6.0f} B/service  {where}:{frame.lineno}"
                )
        d._stop.set()
        await run


def main() -> None:
    n = int(sys.argv[1])
    with asyncio.Runner(loop_factory=daemon.loop_factory()) as runner:
        runner.run(profile(n, "--trace" in sys.argv))


if __name__ == "__main__":
    main()
