"""Where lb userspace's time goes under the bench's loads: the bench's own namespaces,
backends and peers (bench/topology.py, bench/peers.py), one peer started, one load run
from the client's namespace while a profiler samples the peer's process.

    .venv/bin/python bench/results/2026-12-08/userspace-profile.py PEER LOAD PROFILER [OUT]

- PEER: a bench peer (`lb userspace`, `haproxy`...);
- LOAD: `close` (wrk -t1 -c64 with `Connection: close`: new connections, as the
  `connections` workload), `keepalive` (wrk -t1 -c32), `udp` (iperf3 -u -b 0 -l 64);
  LOAD_SECONDS long;
- PROFILER: `py-spy` (py-spy record --native, raw stacks: OUT.stacks, and the functions
  with the most samples, self and inclusive), `perf` (perf record -g on the peer's
  processes, then perf report by shared object and symbol), `none`.

Run as root from the repository root; it takes the bench's lock (no other bench shares
the CPUs), and its namespaces are the bench's (removed at the end).
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import parse
from bench.peers import all_peers, process_tree, start_backends
from bench.topology import bench_lock, topology
from bench.workloads import Context, Durations, iperf_cmd, run_tool, wrk_cmd

LOAD_SECONDS = 10
PY_SPY = str(Path(sys.executable).with_name("py-spy"))


def top(stacks: str, n: int = 40) -> str:
    """The functions with the most samples: where the sample's leaf is (self), and where
    the function is anywhere on the stack (inclusive), in % of all samples."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks.splitlines():
        frames, _, count = line.rpartition(" ")
        if not frames or not count.isdigit():
            continue
        k = int(count)
        total += k
        names = frames.split(";")
        own[names[-1]] += k
        for name in set(names):
            anywhere[name] += k
    out = [f"{total} samples", "", "self %  function"]
    out += [f"{100 * c / total:6.1f}  {f}" for f, c in own.most_common(n)]
    out += ["", "inclusive %  function"]
    out += [f"{100 * c / total:6.1f}  {f}" for f, c in anywhere.most_common(n)]
    return "\n".join(out)


def summary(profiler: str, data: Path, out: Path | None) -> str:
    """The profile's summary: top functions (py-spy), or by object and symbol (perf)."""
    if profiler == "py-spy":
        stacks = data.read_text()
        if out is not None:
            out.with_suffix(".stacks").write_text(stacks)
        return top(stacks)
    if profiler == "perf":
        report = []
        for sort in ("dso", "dso,sym"):
            done = subprocess.run(
                ["perf", "report", "-i", str(data), "--no-children", "--stdio",
                 "--sort", sort, "-g", "none", "--percent-limit", "0.3"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            report.append(done.stdout)
        return "".join(report)
    return ""


async def main(peer_name: str, load: str, profiler: str, out: Path | None) -> None:
    made = all_peers()
    peer = made[peer_name]
    with tempfile.TemporaryDirectory(prefix="lbbench-") as tmp:
        work = Path(tmp)
        async with topology() as topo:
            backends = await start_backends(topo, work)
            if peer.local_vip:
                await topo.vip_local(True)
            try:
                await peer.start(topo, work)
                ctx = Context(topo, peer, Durations(LOAD_SECONDS, 1, 1, LOAD_SECONDS))
                pids = sorted({p for pid in peer.pids() for p in process_tree(pid)})
                prof: asyncio.subprocess.Process | None = None
                data = out.with_suffix(".data") if out is not None else work / "profile"
                if profiler == "py-spy":
                    prof = await asyncio.create_subprocess_exec(
                        PY_SPY, "record", "--native", "-r", "250", "-d", str(LOAD_SECONDS),
                        "-f", "raw", "-o", str(data), "-p", str(pids[0]),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                elif profiler == "perf":
                    prof = await asyncio.create_subprocess_exec(
                        "perf", "record", "-g", "-o", str(data), "-p", ",".join(map(str, pids)),
                        "--", "sleep", str(LOAD_SECONDS),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                if load == "udp":
                    cmd = iperf_cmd(ctx, "-u", "-b", "0", "-l", "64")
                    r = parse.iperf3(await run_tool(cmd, LOAD_SECONDS))
                    said = f"{r.datagrams_per_s:,.0f} datagrams/s, loss {r.lost_percent:.1f}%"
                else:
                    w = parse.wrk(await run_tool(wrk_cmd(ctx, close=load == "close"), LOAD_SECONDS))
                    said = f"{w.requests_per_s:,.0f} requests/s"
                print(f"{peer_name}, {load}: {said}")
                if prof is not None:
                    await prof.wait()
                report = said + "\n\n" + await asyncio.to_thread(summary, profiler, data, out)
                if out is not None:
                    await asyncio.to_thread(out.write_text, report)
                else:
                    print(report)
            finally:
                await peer.stop(topo)
                if peer.local_vip:
                    await topo.vip_local(False)
                for b in backends:
                    await b.stop()


if __name__ == "__main__":
    args = sys.argv[1:]
    with bench_lock():
        asyncio.run(main(args[0], args[1], args[2], Path(args[3]) if len(args) > 3 else None))
