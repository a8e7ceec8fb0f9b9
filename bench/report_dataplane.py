"""The data-plane part of results.md and its plot (dataplane.png), from results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: workload -> (title, [(figure, column title)]), in the tables' order
TABLES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "connections": (
        "New connections: one request each (`wrk -H 'Connection: close'`), then a paced "
        "load at half the peer's rate (bench/loadgen.py)",
        [
            ("connections_per_s", "connections/s"),
            ("paced_per_s", "paced load /s"),
            ("connect_p50_us", "connect p50 us"),
            ("connect_p99_us", "connect p99 us"),
            ("response_p50_us", "response p50 us"),
            ("response_p99_us", "response p99 us"),
            ("balancer_cpu_percent", "balancer CPU %"),
            ("process_cpu_percent", "of which its processes"),
            ("rss_mb", "balancer processes RSS MB"),
        ],
    ),
    "requests": (
        "Keep-alive requests (`wrk --latency`, 32 connections) and TCP ping-pong "
        "(`sockperf --tcp --full-rtt`)",
        [
            ("requests_per_s", "requests/s"),
            ("latency_p50_us", "wrk p50 us"),
            ("latency_p99_us", "wrk p99 us"),
            ("balancer_cpu_percent", "balancer CPU %"),
            ("requests_per_cpu_s", "requests per balancer CPU-s"),
            ("rtt_p50_us", "sockperf RTT p50 us"),
            ("rtt_p99_us", "sockperf RTT p99 us"),
        ],
    ),
    "bulk": (
        "Bulk TCP (iperf3), and the balancer's CPU seconds per GB moved: its CPU's busy "
        "time, or its processes' utime + stime plus that CPU's softirq time if smaller "
        "(bench/README.md)",
        [
            ("gbit_s_1", "1 stream Gbit/s"),
            ("cpu_s_per_gb_1", "1 stream CPU s/GB"),
            ("gbit_s_4", "4 streams Gbit/s"),
            ("cpu_s_per_gb_4", "4 streams CPU s/GB"),
            ("process_s_per_gb_4", "4 streams: processes s/GB"),
            ("softirq_s_per_gb_4", "4 streams: softirq s/GB"),
        ],
    ),
    "udp": (
        "UDP: iperf3 -u unpaced, 64-byte datagrams; sockperf UDP ping-pong",
        [
            ("datagrams_per_s", "datagrams/s delivered"),
            ("loss_percent", "loss %"),
            ("dropped_balancer_percent", "dropped at the balancer's sockets %"),
            ("dropped_backends_percent", "at the backends' sockets %"),
            ("dropped_backlog_percent", "in a CPU's input backlog %"),
            ("dropped_client_send_percent", "client sends refused %"),
            ("rtt_p50_us", "sockperf RTT p50 us"),
            ("rtt_p99_us", "sockperf RTT p99 us"),
        ],
    ),
    "syscalls": (
        "System calls per connection: `strace -c -f` on the balancer's processes while "
        "a fixed number of connections, one request each, 16 at a time, go through it "
        "(not timed)",
        [
            ("syscalls_per_connection", "system calls per connection"),
            ("syscall_errors_per_connection", "of which failed (EAGAIN...)"),
        ],
    ),
}
#: Per-call figures of the syscalls workload are named sys_<call>, and the calls of those
#: that failed syserr_<call>
SYSCALL_PREFIX = "sys_"
SYSCALL_ERRORS = "syserr_"
#: The figures compared with the references, and plotted
HEADLINES: list[tuple[str, str, str]] = [
    ("connections", "connections_per_s", "new connections/s"),
    ("connections", "response_p50_us", "response p50 at half load (us)"),
    ("requests", "requests_per_s", "keep-alive requests/s"),
    ("requests", "requests_per_cpu_s", "keep-alive requests per balancer CPU-s"),
    ("requests", "rtt_p50_us", "TCP ping-pong RTT p50 (us)"),
    ("requests", "rtt_p99_us", "TCP ping-pong RTT p99 (us)"),
    ("bulk", "gbit_s_1", "TCP 1 stream (Gbit/s)"),
    ("bulk", "gbit_s_4", "TCP 4 streams (Gbit/s)"),
    ("bulk", "cpu_s_per_gb_4", "balancer CPU s/GB (4 streams)"),
    ("udp", "datagrams_per_s", "UDP datagrams/s"),
    ("udp", "loss_percent", "UDP loss % at saturation"),
    ("udp", "rtt_p50_us", "UDP ping-pong RTT p50 (us)"),
    ("syscalls", "syscalls_per_connection", "system calls per connection"),
]


def num(v: float) -> str:
    """3 significant digits, thousands separated."""
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def cell(s: dict[str, float] | None) -> str:
    if s is None:
        return ""
    return f"{num(s['median'])} ({num(s['low'])}-{num(s['high'])})"


def dataplane_markdown(
    dp: dict[str, Any], heading: str = "Data plane", note: str = ""
) -> list[str]:
    results = dp["results"]
    d = dp["durations_s"]
    cpus = dp["cpus"]
    tools = ", ".join(dp["tools"].values())
    lines = [
        "",
        f"## {heading}",
        "",
        *([note, ""] if note else []),
        "Client namespace -> balancer namespace -> 3 backend namespaces, over veth; the "
        f"balancer on CPU {cpus['balancer']}, the client and the backends on CPU "
        f"{cpus['client_and_backends']} (RPS steers each namespace's receive processing to "
        "its CPU). `direct`: the client to one backend, routed by the balancer's namespace "
        "(no NAT, no proxy). Each figure: the median of the runs (smallest-largest), peers "
        "in turns within each round. Tool runs: "
        f"wrk {d['wrk']:g} s, paced load {d['paced']:g} s, sockperf {d['sockperf']:g} s, "
        f"iperf3 {d['iperf']:g} s. Tools: {tools}.",
    ]
    troubles: list[str] = []
    for w in dp["workloads"]:
        title, columns = TABLES[w]
        lines += ["", f"### {title}", ""]
        lines.append("| peer | " + " | ".join(c for _, c in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for p in dp["peers"]:
            r = results[p][w]
            if "n/a" in r:
                lines.append(f"| {p} | " + " | ".join(f"n/a ({r['n/a']})" for _ in columns) + " |")
                continue
            figures = r["figures"]
            lines.append(f"| {p} | " + " | ".join(cell(figures.get(k)) for k, _ in columns) + " |")
            for e in (" / ".join(x.strip() for x in e.splitlines()) for e in r["errors"]):
                troubles.append(f"- {p}: {e}" if ": start: " in e else f"- {p}, {w}: {e}")
            for k in ("errors", "paced_failed", "syscalls_failed_connections"):
                if k in figures and figures[k]["high"] > 0:
                    troubles.append(f"- {p}, {w}: {k} up to {num(figures[k]['high'])} in a run")
        if w == "syscalls":
            lines += syscalls_by_call(dp)
    for ref, per in dp["ratios"].items():
        heads = [(w, k, t) for w, k, t in HEADLINES if w in dp["workloads"]]
        lines += [
            "",
            f"### Relative to {ref}",
            "",
            f"Each peer's figure divided by {ref}'s of the same round: median (smallest-"
            "largest) of those ratios. Above 1 is more (faster for rates, slower for times).",
            "",
            "| peer | " + " | ".join(t for _, _, t in heads) + " |",
            "|---|" + "---:|" * len(heads),
        ]
        for p in dp["peers"]:
            if p == ref:
                continue
            cells = [
                "n/a" if "n/a" in results[p][w] or "n/a" in results[ref][w]
                else cell(per.get(p, {}).get(w, {}).get(k))
                for w, k, _ in heads
            ]  # fmt: skip
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    if dp.get("options"):
        lines += options_markdown(dp)
    if troubles:
        lines += ["", "### Errors seen", "", *dict.fromkeys(troubles)]
    return lines


def syscalls_by_call(dp: dict[str, Any]) -> list[str]:
    """The system calls per connection, call by call (median of the runs), the calls
    that the peers make most first."""
    peers = [p for p in dp["peers"] if "figures" in dp["results"][p].get("syscalls", {})]
    per = {p: dp["results"][p]["syscalls"]["figures"] for p in peers}
    calls = {k for figures in per.values() for k in figures if k.startswith(SYSCALL_PREFIX)}
    if not calls:
        return []

    def most(k: str) -> float:
        return max(float(per[p][k]["median"]) for p in peers if k in per[p])

    def calls_of(p: str, k: str) -> str:
        if k not in per[p]:
            return ""
        failed = per[p].get(SYSCALL_ERRORS + k[len(SYSCALL_PREFIX) :])
        errors = f" ({failed['median']:.2f} failed)" if failed and failed["median"] >= 0.01 else ""
        return f"{per[p][k]['median']:.2f}{errors}"

    lines = [
        "",
        "Per system call (median per connection; blank: none; failed: returned an error, "
        "EINPROGRESS, EAGAIN...):",
        "",
        "| system call | " + " | ".join(peers) + " |",
        "|---|" + "---:|" * len(peers),
    ]
    for k in sorted(calls, key=lambda k: (-most(k), k)):
        if most(k) < 0.01:
            continue
        row = [calls_of(p, k) for p in peers]
        lines.append(f"| {k[len(SYSCALL_PREFIX) :]} | " + " | ".join(row) + " |")
    return lines


def options_markdown(dp: dict[str, Any]) -> list[str]:
    """An address option's cost: each option's peer against the same proxy without it,
    per round."""
    heads = [(w, k, t) for w, k, t in HEADLINES if w in dp["workloads"]]
    lines = [
        "",
        "### Address options: relative to the same proxy without them",
        "",
        "Each option's figure divided by its plain proxy's of the same round (`lb "
        "userspace` for lb's, `haproxy` for HAProxy's): median (smallest-largest). Above 1 "
        "is more (faster for rates, slower for times).",
        "",
        "| peer | " + " | ".join(t for _, _, t in heads) + " |",
        "|---|" + "---:|" * len(heads),
    ]
    for p, per in dp["options"].items():
        cells = [
            "n/a" if "n/a" in dp["results"][p][w] else cell(per.get(w, {}).get(k))
            for w, k, _ in heads
        ]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines


def dataplane_plot(out: Path, dp: dict[str, Any], name: str = "dataplane", where: str = "") -> Path:
    import matplotlib.pyplot as plt

    heads = [(w, k, t) for w, k, t in HEADLINES if w in dp["workloads"]]
    cols = 3
    rows = (len(heads) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(15, 4 * rows), squeeze=False)
    peers = dp["peers"]
    for ax, (w, k, title) in zip(axes.flat, heads, strict=False):
        med, low, high = [], [], []
        for p in peers:
            s = dp["results"][p][w].get("figures", {}).get(k)
            med.append(s["median"] if s else 0.0)
            low.append(s["median"] - s["low"] if s else 0.0)
            high.append(s["high"] - s["median"] if s else 0.0)
        xs = list(range(len(peers)))
        ax.bar(xs, med, yerr=[low, high], capsize=4, color="tab:blue", alpha=0.8)
        for x, p in zip(xs, peers, strict=True):
            if "n/a" in dp["results"][p][w]:
                ax.text(x, 0.02, "n/a", ha="center", transform=ax.get_xaxis_transform())
        if k.endswith("_us"):  # latencies: one slow run must not flatten the others
            ax.set_yscale("log")
        ax.set_xticks(xs, peers, rotation=30, ha="right")
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(heads) :]:
        ax.axis("off")
    title = f"data plane {where}" if where else "data plane"
    fig.suptitle(f"{title}: median of the runs, bars: smallest-largest")
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
