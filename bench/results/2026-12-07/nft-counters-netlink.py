"""Issue 17: what reading lb's nftables counters costs, through `nft` and over netlink.

- `idle SIZES [SECONDS]`: `lb run --dataplane nftables` with N services x 10 backends
  (bench/scale.py's config) in a namespace of its own, its CPU time (with the `nft` it
  spawned) over SECONDS (default WINDOW) once started, in % of a core;
- `calls SIZES`: a table `ip lb` of N named counters in a namespace, read 100 times (10
  at 100,000) by `nft -j list counters table ip lb` (what lb ran each second) and by
  the netlink dump (`NftNetlink.counters`: idle, every part of the answer known from
  the dump before; and every part parsed, as when all counters moved), wall time and
  CPU (this process and its children) per read; then min(N, 10,000) affinity sets as
  lb makes them (size 65535, dynamic, timeout) of 3 elements each, counted by `nft -j
  list sets ip` and by `NftNetlink.set_sizes`.

Run as root from the repository root:
    .venv/bin/python bench/results/2026-12-07/nft-counters-netlink.py idle 1,100,1000,10000
    .venv/bin/python bench/results/2026-12-07/nft-counters-netlink.py idle 10000 180
    .venv/bin/python bench/results/2026-12-07/nft-counters-netlink.py calls 10,1000,10000,100000
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.control import Netns, run
from bench.scale import VENV_LB, _cpu_seconds, _ready, config
from bench.topology import bench_lock
from offload.netns import inside
from offload.nft_netlink import NftNetlink
from offload.nftables import query_nft

WINDOW = 30.0
READS = 100


async def idle(n: int, window: float = WINDOW) -> float:
    async with Netns("lbbench-nft17") as ns:
        await run(ns.cmd("ip", "link", "set", "lo", "up"))
        with tempfile.TemporaryDirectory(prefix="lbbench-nft17-") as tmp:
            cfg = Path(tmp) / "lb.yaml"
            cfg.write_text(config(n))
            proc = await asyncio.create_subprocess_exec(
                *ns.cmd(str(VENV_LB), "run", "-c", str(cfg), "--dataplane", "nftables"),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                await _ready(ns, proc)
                await asyncio.sleep(12.0)  # the first reads, and a templates period
                cpu0, t0 = _cpu_seconds(proc.pid), time.perf_counter()
                await asyncio.sleep(window)
                return 100 * (_cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - t0)
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    await proc.wait()


def cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


async def timed(reads: int, read: Callable[[], Awaitable[int]]) -> tuple[float, float, int]:
    """(wall ms, CPU ms) per read, and what the last read found."""
    found = await read()  # warm
    c0, t0 = cpu(), time.perf_counter()
    for _ in range(reads):
        found = await read()
    return (
        1000 * (time.perf_counter() - t0) / reads,
        1000 * (cpu() - c0) / reads,
        found,
    )


async def calls(n: int) -> None:
    async with Netns("lbbench-nft17c") as ns:
        counters = "".join(
            f"counter ip lb c{i} {{ packets {i} bytes {i * 60} }}\n" for i in range(n)
        )
        await run(ns.cmd("nft", "-f", "-"), "table ip lb\n" + counters)
        nl = NftNetlink(ns.name)
        reads = READS if n <= 10_000 else 10

        async def by_nft() -> int:
            with inside(ns.name):
                doc = await query_nft("list", "counters", "table", "ip", "lb")
            return sum(1 for item in doc["nftables"] if "counter" in item)

        async def by_netlink() -> int:
            return len(await asyncio.to_thread(nl.counters, "lb"))

        async def by_netlink_all_new() -> int:
            nl._parts = {}  # as if every counter had moved: every part parsed
            return len(await asyncio.to_thread(nl.counters, "lb"))

        for what, read in (
            ("nft -j list counters", by_nft),
            ("netlink dump, idle", by_netlink),
            ("netlink dump, all parsed", by_netlink_all_new),
        ):
            wall, spent, found = await timed(reads, read)
            print(f"{n} counters, {what}: {wall:.2f} ms, CPU {spent:.2f} ms ({found} read)")

        sets = [f"a{i}" for i in range(min(n, 10_000))]
        script = "".join(
            f"add set ip lb {s} {{ type ipv4_addr; size 65535; flags dynamic,timeout; "
            f"timeout 1h; elements = {{ 10.0.0.1, 10.0.0.2, 10.0.0.3 }} }}\n"
            for s in sets
        )
        await run(ns.cmd("nft", "-f", "-"), script)

        async def sets_by_nft() -> int:
            with inside(ns.name):
                doc = await query_nft("list", "sets", "ip")
            return sum(
                len(item["set"].get("elem", [])) for item in doc["nftables"] if "set" in item
            )

        async def sets_by_netlink() -> int:
            return sum((await asyncio.to_thread(nl.set_sizes, "lb", sets)).values())

        for what, read in (("nft -j list sets ip", sets_by_nft), ("netlink", sets_by_netlink)):
            wall, spent, found = await timed(max(reads // 10, 3), read)
            print(f"{len(sets)} sets, {what}: {wall:.2f} ms, CPU {spent:.2f} ms ({found} elements)")
        nl.close()


def main(part: str, sizes: list[int], window: float = WINDOW) -> None:
    with bench_lock():  # no other bench meanwhile: each removes the lbbench namespaces
        for n in sizes:
            if part == "idle":
                share = asyncio.run(idle(n, window))
                print(f"lb run, nftables, {n} services: idle CPU {share:.2f}% of a core")
            else:
                asyncio.run(calls(n))
            sys.stdout.flush()


if __name__ == "__main__":
    main(
        sys.argv[1],
        [int(s) for s in sys.argv[2].split(",")],
        float(sys.argv[3]) if len(sys.argv) > 3 else WINDOW,
    )
