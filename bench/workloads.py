"""The data-plane workloads: each runs its load tools in the client's namespace against a
peer, bounded in time (every tool is given its duration, and killed past a deadline), and
returns its figures for that run.

- `connections`: new connections, one small request each (`wrk -H 'Connection: close'`):
  connections/s flat out, and the balancer's CPU meanwhile; then connect and response
  latency at half of the peer's median rate so far (bench/loadgen.py: wrk2 is not in
  Debian, wrk cannot pace), and the RSS of the peer's processes;
- `requests`: keep-alive requests (`wrk --latency`): requests/s and latency; and one TCP
  ping-pong (`sockperf ping-pong --tcp --full-rtt`): round trips in microseconds;
- `bulk`: iperf3 over 1 and 4 streams (-P 4): Gbit/s, and the balancer's CPU per GB
  moved (see Cpu): its processes are pinned to its CPU and RPS steers its receive
  processing there, so its cost is that CPU's busy time (/proc/stat), or the peer's
  processes' utime + stime (/proc/<pid>/stat, children included) plus the CPU's
  softirq time, whichever is smaller;
- `udp`: iperf3 -u unpaced with 64-byte datagrams: datagrams/s delivered and loss; and
  `sockperf ping-pong` over UDP: round trips;
- `syscalls`: not timed: `strace -c -f` attached to the peer's processes (every thread
  and child) while a fixed number of connections, one request each, go through it
  (bench/loadgen.py --count, a few at a time); its system calls divided by that number,
  in all and per call. Only for the peers whose process relays (strace slows it: this is
  its own step, after the timed ones of the round).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench import loadgen, parse
from bench.peers import HTTP, IPERF, SOCKPERF, Peer, process_tree, tree_cpu_ticks, tree_rss_kb
from bench.topology import BALANCER_NS, CLIENT_NS, Topology, sh

TICK = 100.0  # USER_HZ: /proc's clock ticks per second


@dataclass(frozen=True)
class Durations:
    """Seconds per tool run."""

    wrk: float
    paced: float
    sockperf: float
    iperf: float
    #: not a duration: the connections the `syscalls` workload counts over
    counted: int = 2000

    @classmethod
    def for_mode(cls, quick: bool) -> Durations:
        return cls(1, 1, 1, 1, 200) if quick else cls(5, 4, 3, 3, 2000)


async def run_tool(cmd: list[str], seconds: float) -> str:
    """Run a load tool to its end, which it reaches by itself after `seconds`; killed (and
    reported) if it is still there well after."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 20)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{' '.join(cmd)}: still running {seconds + 20:.0f}s in") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {text[-500:]}")
    return text


Figures = dict[str, float]


class Context:
    """What a workload needs: the network, the peer, the durations, and what earlier runs
    of this peer found (the connection rate that sets the paced load)."""

    def __init__(self, topo: Topology, peer: Peer, d: Durations) -> None:
        self.topo = topo
        self.peer = peer
        self.d = d
        self.rates: list[float] = []

    def url(self) -> str:
        host, port = self.peer.target(HTTP, self.topo)
        return f"http://{host}:{port}/"

    def client(self, *cmd: str) -> list[str]:
        return self.topo.on_client(*cmd)

    def cpu(self) -> Cpu:
        with open("/proc/stat") as f:
            c = parse.proc_stat_cpu(f.read(), self.topo.balancer_cpu)
        busy = sum(c[k] for k in ("user", "nice", "system", "irq", "softirq"))
        return Cpu(busy, c["softirq"], sum(tree_cpu_ticks(p) for p in self.peer.pids()))


@dataclass(frozen=True)
class Cpu:
    """Ticks so far: the balancer CPU's busy time and its softirq part, and the peer's
    processes' utime + stime. The kernel accounts by tick: a tick that lands in a softirq
    counts as softirq for the CPU and as stime for the task it interrupted, so process +
    softirq counts that part twice; busy also counts whatever else ran on the CPU. Both
    are upper bounds of the balancer's cost: `total` is the smaller."""

    busy: int
    softirq: int
    process: int

    @property
    def total(self) -> int:
        return min(self.busy, self.process + self.softirq)

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.busy - other.busy, self.softirq - other.softirq, self.process - other.process
        )


def wrk_cmd(ctx: Context, close: bool) -> list[str]:
    # One thread: the client has one CPU, shared with the backends.
    conns = "64" if close else "32"
    args = ["wrk", "-t1", f"-c{conns}", f"-d{ctx.d.wrk:g}s", "--latency"]
    if close:
        args += ["-H", "Connection: close"]
    return ctx.client(*args, ctx.url())


async def connections(ctx: Context) -> Figures:
    before = ctx.cpu()
    began = time.monotonic()
    w = parse.wrk(await run_tool(wrk_cmd(ctx, close=True), ctx.d.wrk))
    cpu = ctx.cpu() - before
    took = time.monotonic() - began
    ctx.rates.append(w.requests_per_s)
    rate = statistics.median(ctx.rates) / 2
    host, port = ctx.peer.target(HTTP, ctx.topo)
    gen = [sys.executable, "-m", "bench.loadgen", host, str(port), f"{rate:.0f}"]
    p = json.loads(await run_tool(ctx.client(*gen, f"{ctx.d.paced:g}"), ctx.d.paced))
    if not p["completed"]:
        raise RuntimeError(f"no paced connection completed: {p}")
    return {
        "connections_per_s": w.requests_per_s,
        "errors": float(w.socket_errors + w.non_2xx),
        # the balancer's CPU while wrk ran, in % of one CPU: all of it, its processes
        "balancer_cpu_percent": 100 * cpu.total / TICK / took,
        "process_cpu_percent": 100 * cpu.process / TICK / took,
        "rss_mb": sum(tree_rss_kb(pid) for pid in ctx.peer.pids()) / 1024,
        "paced_per_s": p["completed"] / p["seconds"],
        "paced_failed": float(p["failed"] + p["skipped"]),
        "connect_p50_us": p["connect_p50_us"],
        "connect_p99_us": p["connect_p99_us"],
        "response_p50_us": p["response_p50_us"],
        "response_p99_us": p["response_p99_us"],
    }


def sockperf_cmd(ctx: Context, udp: bool) -> list[str]:
    host, port = ctx.peer.target(SOCKPERF, ctx.topo)
    proto = [] if udp else ["--tcp"]
    return ctx.client(
        "sockperf", "ping-pong", *proto, "-i", host, "-p", str(port),
        "-t", f"{ctx.d.sockperf:g}", "--full-rtt",
    )  # fmt: skip


async def requests(ctx: Context) -> Figures:
    before = ctx.cpu()
    began = time.monotonic()
    w = parse.wrk(await run_tool(wrk_cmd(ctx, close=False), ctx.d.wrk))
    cpu = ctx.cpu() - before
    took = time.monotonic() - began
    s = parse.sockperf(await run_tool(sockperf_cmd(ctx, udp=False), ctx.d.sockperf))
    return {
        "requests_per_s": w.requests_per_s,
        "errors": float(w.socket_errors + w.non_2xx),
        "latency_p50_us": w.latency_us[50],
        "latency_p99_us": w.latency_us[99],
        # the client, not the balancer, may be the limit of the rate: what a request costs
        # the balancer's CPU is the figure to compare (requests per CPU-second)
        "balancer_cpu_percent": 100 * cpu.total / TICK / took,
        "requests_per_cpu_s": w.requests / max(cpu.total / TICK, 1 / TICK),
        "rtt_p50_us": s.percentiles_us[50.0],
        "rtt_p99_us": s.percentiles_us[99.0],
    }


def iperf_cmd(ctx: Context, *args: str) -> list[str]:
    host, port = ctx.peer.target(IPERF, ctx.topo)
    return ctx.client("iperf3", "-c", host, "-p", str(port), "-t", f"{ctx.d.iperf:g}", "-J", *args)


async def bulk(ctx: Context) -> Figures:
    out: Figures = {}
    for streams in (1, 4):
        before = ctx.cpu()
        r = parse.iperf3(await run_tool(iperf_cmd(ctx, "-P", str(streams)), ctx.d.iperf))
        cpu = ctx.cpu() - before
        gb = r.bytes / 1e9
        out[f"gbit_s_{streams}"] = r.bits_per_second / 1e9
        out[f"cpu_s_per_gb_{streams}"] = cpu.total / TICK / gb
        out[f"process_s_per_gb_{streams}"] = cpu.process / TICK / gb
        out[f"softirq_s_per_gb_{streams}"] = cpu.softirq / TICK / gb
    return out


async def drops(topo: Topology) -> dict[str, int]:
    """Where datagrams are dropped, so far: the balancer's UDP sockets (a receive buffer
    full: a proxy that does not keep up), the backends' (the servers), the client's sends
    refused (its send buffer full), and every CPU's input backlog (softnet)."""

    async def udp_of(ns: str) -> dict[str, int]:
        return parse.snmp_udp(await sh("ip", "netns", "exec", ns, "cat", "/proc/net/snmp"))

    balancer = await udp_of(BALANCER_NS)
    backends = [await udp_of(ns) for ns in topo.backend_ns]
    client = await udp_of(CLIENT_NS)
    backlog = parse.softnet_dropped(await sh("cat", "/proc/net/softnet_stat"))
    return {
        "balancer": balancer["RcvbufErrors"],
        "backends": sum(b["RcvbufErrors"] for b in backends),
        "client_send": client["SndbufErrors"],
        "backlog": backlog,
    }


async def udp(ctx: Context) -> Figures:
    before = await drops(ctx.topo)
    r = parse.iperf3(await run_tool(iperf_cmd(ctx, "-u", "-b", "0", "-l", "64"), ctx.d.iperf))
    after = await drops(ctx.topo)
    s = parse.sockperf(await run_tool(sockperf_cmd(ctx, udp=True), ctx.d.sockperf))
    sent = max(r.packets, 1)
    return {
        "datagrams_per_s": r.datagrams_per_s,
        "loss_percent": r.lost_percent,
        # what the loss is made of, in % of the datagrams sent (iperf3's count)
        **{f"dropped_{k}_percent": 100 * (after[k] - before[k]) / sent for k in after},
        "rtt_p50_us": s.percentiles_us[50.0],
        "rtt_p99_us": s.percentiles_us[99.0],
    }


#: Connections in flight while the system calls are counted
COUNTED_CONCURRENCY = 16


async def syscalls(ctx: Context) -> Figures:
    pids = sorted({p for pid in ctx.peer.pids() for p in process_tree(pid)})
    if not pids:
        raise RuntimeError("no process to trace")
    host, port = ctx.peer.target(HTTP, ctx.topo)
    n = ctx.d.counted
    with tempfile.TemporaryDirectory(prefix="lbbench-strace-") as tmp:
        table = Path(tmp) / "strace.txt"
        args = [a for pid in pids for a in ("-p", str(pid))]
        strace = await asyncio.create_subprocess_exec(
            "strace", "-c", "-f", "-o", str(table), *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        drain: asyncio.Task[None] | None = None
        try:
            drain = await _attached(strace, len(pids))
            gen = [sys.executable, "-m", "bench.loadgen", host, str(port), "--count", str(n)]
            gen += ["--concurrency", str(COUNTED_CONCURRENCY)]
            # bounded by the count: each connection fails after loadgen.TIMEOUT at worst
            bound = n / COUNTED_CONCURRENCY * loadgen.TIMEOUT
            p = json.loads(await run_tool(ctx.client(*gen), bound))
            await asyncio.sleep(0.5)  # the last connections' closes, on the balancer's side
        finally:
            with contextlib.suppress(ProcessLookupError):
                strace.send_signal(signal.SIGINT)  # detach: it writes its table
            try:
                await asyncio.wait_for(strace.wait(), 10)
            except TimeoutError:
                strace.kill()
                await strace.wait()
            if drain is not None:
                await drain
        counts = parse.strace_summary(table.read_text())
    out: Figures = {
        "syscalls_per_connection": counts.total / n,
        "syscall_errors_per_connection": sum(counts.errors.values()) / n,
        "syscalls_failed_connections": float(p["failed"]),
    }
    for name, calls in counts.calls.items():
        out[f"sys_{name}"] = calls / n
    for name, errors in counts.errors.items():  # EINPROGRESS, EAGAIN, EEXIST...
        out[f"syserr_{name}"] = errors / n
    return out


async def _attached(strace: asyncio.subprocess.Process, processes: int) -> asyncio.Task[None]:
    """Wait until strace says it is attached to every process (with their threads); the
    task that reads the rest of its messages (which must not fill the pipe)."""
    assert strace.stderr is not None
    seen = 0
    async with asyncio.timeout(10):
        while seen < processes:
            line = await strace.stderr.readline()
            if not line:
                raise RuntimeError(f"strace exited ({await strace.wait()}) before attaching")
            seen += b"attached" in line
    return asyncio.get_running_loop().create_task(_drain(strace.stderr))


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(4096):
        pass


WORKLOADS: dict[str, Callable[[Context], Awaitable[Figures]]] = {
    "connections": connections,
    "requests": requests,
    "bulk": bulk,
    "udp": udp,
    "syscalls": syscalls,
}
