"""Data plane: the same services carried by each peer in turn, over the same namespaces
(bench/topology.py), against the same backends, with the same workloads
(bench/workloads.py). Peers take turns within each round, and rounds repeat, so that a
slow spell of the machine falls on every peer alike; every ratio is taken between the
runs of one round.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.peers import all_peers, start_backends
from bench.stats import Summary
from bench.topology import topology
from bench.workloads import WORKLOADS, Context, Durations

#: The peers the ratios are taken against: the physical limit, and the reference proxy
REFERENCES = ("direct", "haproxy")
#: Figures that count trouble, not performance: reported, never turned into ratios
COUNTS = {"errors", "paced_failed", "syscalls_failed_connections"}
TOOLS = ("wrk", "iperf3", "sockperf", "haproxy", "nginx", "strace")

#: peer -> workload -> figure -> one value per round (None: that run failed)
Runs = dict[str, dict[str, dict[str, list[float | None]]]]


def not_applicable(peer: str, workload: str) -> str | None:
    p = all_peers()[peer]
    if workload == "udp" and not p.udp:
        return "no UDP proxy"
    if workload == "syscalls" and not p.userspace:
        return "no process relays the connections"
    return p.same_as_plain.get(workload)


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def tool_versions() -> dict[str, str]:
    def first_line(*cmd: str) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = (done.stdout + done.stderr).strip().splitlines()
        return lines[0].strip() if lines else "?"

    return {
        "wrk": first_line("wrk", "--version"),
        "iperf3": first_line("iperf3", "--version"),
        "sockperf": first_line("sockperf", "--version").replace("sockperf: ", ""),
        "haproxy": first_line("haproxy", "-v"),
        "nginx": first_line("nginx", "-v"),
    }


async def measure(
    peers: list[str],
    workloads: list[str],
    runs: int,
    quick: bool,
    advance: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    d = Durations.for_mode(quick)
    values: Runs = {p: {w: {} for w in workloads} for p in peers}
    errors: dict[str, dict[str, list[str]]] = {p: {w: [] for w in workloads} for p in peers}
    made = all_peers()
    with tempfile.TemporaryDirectory(prefix="lbbench-") as tmp:
        work = Path(tmp)
        async with topology() as topo:
            backends = await start_backends(topo, work)
            contexts = {p: Context(topo, made[p], d) for p in peers}
            try:
                for r in range(runs):
                    for name in peers:
                        await one_round(
                            name, r, workloads, contexts[name], work, values=values, errors=errors
                        )
                        advance(f"round {r + 1}/{runs}: {name}")
            finally:
                for b in backends:
                    await b.stop()
    return {
        "durations_s": d.__dict__,
        "cpus": {"client_and_backends": topo.client_cpu, "balancer": topo.balancer_cpu},
        "tools": tool_versions(),
        "peers": peers,
        "kinds": {p: "userspace" if made[p].userspace else "kernel" for p in peers},
        "workloads": workloads,
        "results": summarise(values, errors, peers, workloads),
        "ratios": {ref: ratios(values, ref) for ref in REFERENCES if ref in peers},
        # an address option's cost: its peer against the same proxy without it
        "options": {
            p: ratios(values, made[p].plain).get(p, {}) for p in peers if made[p].plain in peers
        },
    }


#: A figure every run of the syscalls workload reports, and its per-call ones' prefix: a
#: call a run did not see is a call made 0 times in it (a failed run has none of them).
SYSCALLS_RAN = "syscalls_per_connection"
SYSCALL_PREFIX = "sys_"


def _absent(key: str, figures: dict[str, float]) -> float | None:
    """A figure a run did not report: 0 for a system call the syscalls workload did not
    see (it ran), else unknown."""
    return 0.0 if key.startswith(SYSCALL_PREFIX) and SYSCALLS_RAN in figures else None


def record(runs: dict[str, list[float | None]], figures: dict[str, float], r: int) -> None:
    """Add round `r`'s figures of one workload to the series of the rounds before."""
    for key, series in runs.items():
        if key not in figures:
            series.append(_absent(key, figures))
    for key, value in figures.items():
        if key not in runs:  # first seen now: what the earlier rounds had of it
            ran = runs.get(SYSCALLS_RAN, [None] * r)[:r]
            runs[key] = [_absent(key, {} if v is None else {SYSCALLS_RAN: v}) for v in ran]
        runs[key].append(value)


async def one_round(
    name: str,
    r: int,
    workloads: list[str],
    ctx: Context,
    work: Path,
    *,
    values: Runs,
    errors: dict[str, dict[str, list[str]]],
) -> None:
    """One run of each workload against one peer, started for them and stopped after."""
    topo, peer = ctx.topo, ctx.peer
    todo = [w for w in workloads if not_applicable(name, w) is None]
    if peer.local_vip:
        await topo.vip_local(True)
    try:
        try:
            await peer.start(topo, work)
        except RuntimeError as e:
            for w in todo:
                errors[name][w].append(f"round {r + 1}: start: {e}")
                for series in values[name][w].values():
                    series.append(None)
            return
        for w in todo:
            await topo.flush_conntrack()  # each workload starts from an empty table
            try:
                figures = await WORKLOADS[w](ctx)
            except (RuntimeError, ValueError, KeyError) as e:
                errors[name][w].append(f"round {r + 1}: {type(e).__name__}: {e}")
                figures = {}
            record(values[name][w], figures, r)
    finally:
        await peer.stop(topo)
        if peer.local_vip:
            await topo.vip_local(False)
        await topo.reset_kernel_state()


def summarise(
    values: Runs, errors: dict[str, dict[str, list[str]]], peers: list[str], workloads: list[str]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in peers:
        out[p] = {}
        for w in workloads:
            if reason := not_applicable(p, w):
                out[p][w] = {"n/a": reason}
                continue
            figures = {
                k: Summary.of([v for v in series if v is not None]).as_dict()
                for k, series in values[p][w].items()
                if any(v is not None for v in series)
            }
            out[p][w] = {"figures": figures, "errors": errors[p][w]}
    return out


def ratios(values: Runs, ref: str) -> dict[str, dict[str, dict[str, dict[str, float | int]]]]:
    """peer / reference for each figure, per round (both runs of one round), summarised."""
    out: dict[str, dict[str, dict[str, dict[str, float | int]]]] = {}
    for p, per in values.items():
        if p == ref:
            continue
        for w, figures in per.items():
            for k, series in figures.items():
                base = values[ref].get(w, {}).get(k)
                if k in COUNTS or base is None:
                    continue
                pairs = [
                    a / b
                    for a, b in zip(series, base, strict=False)
                    if a is not None and b is not None and b != 0
                ]
                if pairs:
                    out.setdefault(p, {}).setdefault(w, {})[k] = Summary.of(pairs).as_dict()
    return out
