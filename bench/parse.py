"""Read the load tools' output (wrk, iperf3 -J, sockperf) and /proc: pure functions, no I/O,
so that tests/test_bench.py checks them on captured output without root."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ToolOutputError(ValueError):
    """The tool's output does not hold what the bench needs (it failed, or changed)."""


def duration_us(text: str) -> float:
    """wrk's durations ('795.12us', '1.00ms', '2.00s') in microseconds."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ToolOutputError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class Wrk:
    requests_per_s: float
    requests: int
    latency_us: dict[int, float]  # percentile -> us (with --latency)
    socket_errors: int  # connect + read + write + timeout
    non_2xx: int


def wrk(text: str) -> Wrk:
    rate = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in", text, re.M)
    if not rate or not total:
        raise ToolOutputError(f"no request rate in wrk's output: {text[-300:]!r}")
    latency = {
        int(p): duration_us(v)
        for p, v in re.findall(r"^\s+(\d+)%\s+(\S+)$", text, re.M)
    }  # fmt: skip
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return Wrk(
        requests_per_s=float(rate.group(1)),
        requests=int(total.group(1)),
        latency_us=latency,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


@dataclass(frozen=True)
class Iperf:
    seconds: float
    bytes: int  # received
    bits_per_second: float  # received
    packets: int  # UDP: datagrams sent (0 for TCP)
    lost_packets: int  # UDP
    retransmits: int  # TCP

    @property
    def datagrams_per_s(self) -> float:
        return (self.packets - self.lost_packets) / self.seconds

    @property
    def lost_percent(self) -> float:
        return 100 * self.lost_packets / self.packets if self.packets else 0.0


def iperf3(text: str) -> Iperf:
    """`iperf3 -J` of a TCP or UDP test, as the receiver counted it."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ToolOutputError(f"iperf3 did not print JSON: {text[-300:]!r}") from e
    if "error" in doc:
        raise ToolOutputError(f"iperf3: {doc['error']}")
    end = doc.get("end", {})
    received = end.get("sum_received")
    if not received:
        raise ToolOutputError("iperf3's JSON has no end.sum_received")
    udp = doc.get("start", {}).get("test_start", {}).get("protocol") == "UDP"
    return Iperf(
        seconds=float(received["seconds"]),
        bytes=int(received["bytes"]),
        bits_per_second=float(received["bits_per_second"]),
        packets=int(received.get("packets", 0)) if udp else 0,
        lost_packets=int(received.get("lost_packets", 0)) if udp else 0,
        retransmits=int(end.get("sum_sent", {}).get("retransmits", 0)),
    )


@dataclass(frozen=True)
class Sockperf:
    observations: int
    percentiles_us: dict[float, float]  # 50.0 -> us (round trip with --full-rtt)
    dropped: int


def sockperf(text: str) -> Sockperf:
    """`sockperf ping-pong` statistics (its colours removed)."""
    text = _ANSI.sub("", text)
    total = re.search(r"Total (\d+) observations", text)
    if not total:
        raise ToolOutputError(f"no observation in sockperf's output: {text[-300:]!r}")
    pct = {
        float(p): float(v)
        for p, v in re.findall(r"---> percentile\s+([0-9.]+)\s+=\s+([0-9.]+)", text)
    }
    dropped = re.search(r"# dropped messages = (\d+)", text)
    return Sockperf(
        observations=int(total.group(1)),
        percentiles_us=pct,
        dropped=int(dropped.group(1)) if dropped else 0,
    )


def proc_stat_cpu(text: str, cpu: int) -> dict[str, int]:
    """One CPU's line of /proc/stat, in clock ticks (USER_HZ)."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == f"cpu{cpu}":
            return dict(zip(names, (int(x) for x in fields[1:9]), strict=True))
    raise ToolOutputError(f"no cpu{cpu} in /proc/stat")


def proc_pid_stat(text: str) -> tuple[int, int]:
    """(parent pid, CPU ticks) from /proc/<pid>/stat: utime + stime, and cutime + cstime,
    the time of children it has reaped (lb runs `nft` and `conntrack`: summed over a
    process tree without them, a child that ends between two readings would take its
    time away). The name may hold spaces and parentheses: fields count from the last ')'."""
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), sum(int(f) for f in fields[11:15])


def proc_status_rss_kb(text: str) -> int:
    """VmRSS from /proc/<pid>/status, kB (0 for a kernel thread or a zombie: no line)."""
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


@dataclass(frozen=True)
class Strace:
    calls: dict[str, int]  # system call -> calls
    errors: dict[str, int]  # system call -> calls that failed (EAGAIN, say)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def strace_summary(text: str) -> Strace:
    """The table `strace -c` writes when it detaches (`% time seconds usecs/call calls
    errors syscall`; errors blank when none), without its total line."""
    calls: dict[str, int] = {}
    errors: dict[str, int] = {}
    seen_header = False
    for line in text.splitlines():
        fields = line.split()
        if fields[:1] == ["%"] and fields[-1:] == ["syscall"]:
            seen_header = True
            continue
        if not seen_header or not fields or fields[0].startswith("-") or fields[-1] == "total":
            continue
        if len(fields) not in (5, 6) or not fields[3].isdigit():
            raise ToolOutputError(f"not a line of strace -c's table: {line!r}")
        calls[fields[-1]] = int(fields[3])
        if len(fields) == 6:
            errors[fields[-1]] = int(fields[4])
    if not seen_header:
        raise ToolOutputError(f"no strace -c table: {text[-300:]!r}")
    return Strace(calls, errors)


def snmp_udp(text: str) -> dict[str, int]:
    """The `Udp:` counters of /proc/net/snmp (a namespace's own): InDatagrams,
    RcvbufErrors (dropped: a socket's receive buffer was full), SndbufErrors..."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp: ")]
    if len(rows) != 2 or len(rows[0]) != len(rows[1]):
        raise ToolOutputError("no Udp: counters in /proc/net/snmp")
    return dict(zip(rows[0], (int(x) for x in rows[1]), strict=True))


def softnet_dropped(text: str) -> int:
    """Packets the kernel dropped because a CPU's input backlog was full
    (/proc/net/softnet_stat's second column, summed over the CPUs)."""
    return sum(int(line.split()[1], 16) for line in text.splitlines() if line.strip())
