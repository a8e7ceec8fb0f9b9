"""What a connection, a keep-alive request and a datagram cost lb userspace's CPU, before
and after a change, beside HAProxy (and nginx stream for UDP): the bench's namespaces,
backends and peers (bench/topology.py, bench/peers.py), the peers in turns each round.

    .venv/bin/python bench/results/2026-12-08/userspace-cost.py ROUNDS OUT.json NAME=DIR...

Each NAME=DIR is an lb whose `lb` and `offload` packages are in DIR (put first on
PYTHONPATH: `git archive HEAD lb offload | tar -x -C DIR` is the committed one); `haproxy`
and `nginx stream` are the bench's peers. Per round and peer:
- `conn`: CONNECTIONS connections, one `Connection: close` request each, IN_FLIGHT at a
  time (bench/loadgen.py --count: as fast as they go); connections/s, and the balancer's
  CPU per connection: its processes' utime + stime plus its CPU's softirq time
  (bench/workloads.py's Cpu), in microseconds;
- `keepalive`: wrk -t1 -c32 for SECONDS: requests/s and CPU microseconds per request;
- `udp`: iperf3 -u -b 0 -l 64 for SECONDS: datagrams/s delivered, loss, and CPU
  microseconds per datagram delivered (not for haproxy: no UDP).
The CPU figures are the robust ones on a shared machine: another process on the
balancer's CPU slows a peer's rates but does not add to its processes' time.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import parse
from bench.peers import HTTP, LbAt, Peer, all_peers, process_tree, start_backends
from bench.topology import bench_lock, topology
from bench.workloads import TICK, Context, Durations, iperf_cmd, run_tool, wrk_cmd

CONNECTIONS = 6000
IN_FLIGHT = 16
SECONDS = 4


def switches(peer: Peer) -> int:
    """Context switches of the peer's processes (voluntary and not), so far."""
    total = 0
    for pid in {p for top in peer.pids() for p in process_tree(top)}:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.endswith("ctxt_switches:") or "ctxt_switches:" in line:
                total += int(line.split()[1])
    return total


def oncpu_ns(peer: Peer) -> int:
    """Time the peer's threads have been on a CPU (schedstat, nanoseconds: not sampled by
    tick, and including the softirq work done while they ran)."""
    total = 0
    for pid in {p for top in peer.pids() for p in process_tree(top)}:
        tasks = Path(f"/proc/{pid}/task")
        try:
            for t in tasks.iterdir():
                total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue
    return total


def user_ticks(peer: Peer) -> int:
    """User-mode CPU ticks of the peer's processes (utime): the part that is theirs alone
    (the kernel's softirq work lands in stime, whoever it was for)."""
    total = 0
    for pid in {p for top in peer.pids() for p in process_tree(top)}:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        total += int(text[text.rindex(")") + 2 :].split()[11])
    return total


async def one(ctx: Context, what: str) -> dict[str, float]:
    sw = switches(ctx.peer)
    ut = user_ticks(ctx.peer)
    on = oncpu_ns(ctx.peer)
    before = ctx.cpu()
    began = time.monotonic()
    if what == "conn":
        host, port = ctx.peer.target(HTTP, ctx.topo)
        gen = [sys.executable, "-m", "bench.loadgen", host, str(port), "--count"]
        gen += [str(CONNECTIONS), "--concurrency", str(IN_FLIGHT)]
        p = json.loads(await run_tool(ctx.client(*gen), 60))
        cpu = ctx.cpu() - before
        n = p["completed"]
        return {
            "per_s": n / p["seconds"],
            "failed": p["failed"],
            "switches": (switches(ctx.peer) - sw) / n,
            "oncpu_us": (oncpu_ns(ctx.peer) - on) / n / 1e3,
            "user_us": (user_ticks(ctx.peer) - ut) / TICK / n * 1e6,
            "cpu_us": cpu.total / TICK / n * 1e6,
            "process_us": cpu.process / TICK / n * 1e6,
        }
    if what == "keepalive":
        w = parse.wrk(await run_tool(wrk_cmd(ctx, close=False), SECONDS))
        cpu = ctx.cpu() - before
        return {
            "per_s": w.requests_per_s,
            "cpu_us": cpu.total / TICK / w.requests * 1e6,
            "oncpu_us": (oncpu_ns(ctx.peer) - on) / w.requests / 1e3,
            "user_us": (user_ticks(ctx.peer) - ut) / TICK / w.requests * 1e6,
            "process_us": cpu.process / TICK / w.requests * 1e6,
            "seconds": time.monotonic() - began,
        }
    r = parse.iperf3(await run_tool(iperf_cmd(ctx, "-u", "-b", "0", "-l", "64"), SECONDS))
    cpu = ctx.cpu() - before
    delivered = r.packets - r.lost_packets
    return {
        "per_s": r.datagrams_per_s,
        "loss_percent": r.lost_percent,
        "cpu_us": cpu.total / TICK / delivered * 1e6,
        "oncpu_us": (oncpu_ns(ctx.peer) - on) / delivered / 1e3,
        "user_us": (user_ticks(ctx.peer) - ut) / TICK / delivered * 1e6,
        "process_us": cpu.process / TICK / delivered * 1e6,
    }


async def main(rounds: int, out: Path, lbs: dict[str, str], loads: list[str]) -> None:
    made = all_peers()
    peers: list[Peer] = [made["haproxy"], made["nginx stream"]]
    peers += [LbAt(name, path) for name, path in lbs.items()]
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        p.name: {w: [] for w in loads} for p in peers
    }
    with tempfile.TemporaryDirectory(prefix="lbbench-") as tmp:
        work = Path(tmp)
        async with topology() as topo:
            backends = await start_backends(topo, work)
            d = Durations(SECONDS, 1, 1, SECONDS)
            try:
                for r in range(rounds):
                    for peer in peers if r % 2 == 0 else list(reversed(peers)):
                        ctx = Context(topo, peer, d)
                        await topo.vip_local(True)
                        try:
                            await peer.start(topo, work)
                            for w in loads:
                                if w == "udp" and not peer.udp:
                                    continue
                                if w != "udp" and peer.name == "nginx stream":
                                    continue  # the TCP reference is haproxy
                                await topo.flush_conntrack()
                                fig = await one(ctx, w)
                                results[peer.name][w].append(fig)
                                print(f"round {r + 1} {peer.name} {w}: {fig}", flush=True)
                        finally:
                            await peer.stop(topo)
                            await topo.vip_local(False)
                            await topo.reset_kernel_state()
                        text = json.dumps(results, indent=1) + "\n"
                        await asyncio.to_thread(out.write_text, text)
            finally:
                for b in backends:
                    await b.stop()
    for name, per in results.items():
        for w, runs in per.items():
            if runs:
                med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
                print(name, w, {k: round(v, 2) for k, v in med.items()})


if __name__ == "__main__":
    rounds, target = int(sys.argv[1]), Path(sys.argv[2])
    rest = sys.argv[3:]
    loads = ["conn", "keepalive", "udp"]
    if rest and rest[0].startswith("--loads="):
        loads = rest[0].removeprefix("--loads=").split(",")
        rest = rest[1:]
    variants = dict(a.split("=", 1) for a in rest)
    with bench_lock():
        asyncio.run(main(rounds, target, variants, loads))
