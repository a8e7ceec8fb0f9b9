"""New connections at a fixed rate, for connect latency at a given load (wrk2 is not in
Debian; wrk only runs flat out).

`python -m bench.loadgen HOST PORT RATE SECONDS` opens RATE connections per second for
SECONDS (a bounded run: it stops by itself), each sending one `Connection: close` HTTP
request and reading the response to its end, and prints one JSON line: connections
offered, completed and failed, and the p50/p99 connect and response times (microseconds,
from the connect call) of the completed ones. Started inside the client's namespace by
bench/workloads.py.

`python -m bench.loadgen HOST PORT --count N --concurrency C` makes exactly N such
connections, C at a time (a new one as soon as one ends, however long that takes: the
`syscalls` workload counts the balancer's system calls per connection under strace, which
slows it), and prints the same JSON line.

A bare epoll loop rather than asyncio: it shares a CPU with the backends, and asyncio's
per-connection cost made it the bottleneck at about 2,000 connections/s.
"""

from __future__ import annotations

import errno
import json
import select
import socket
import sys
import time
from dataclasses import dataclass, field

from bench.stats import percentile

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
TIMEOUT = 3.0  # per connection: a lost SYN is retransmitted after 1 s, so this sees it
MAX_IN_FLIGHT = 4000  # beyond this the target is not keeping up: count, do not pile on


@dataclass
class Tally:
    connect_us: list[float] = field(default_factory=list)
    response_us: list[float] = field(default_factory=list)
    failed: int = 0
    skipped: int = 0  # not started: MAX_IN_FLIGHT reached


@dataclass
class Conn:
    sock: socket.socket
    start: float
    connected: float = 0.0


class Engine:
    """Connections in flight on one epoll: each connects, sends REQUEST, reads to the
    server's close; a connection past TIMEOUT fails."""

    def __init__(self, host: str, port: int) -> None:
        self.addr = (host, port)
        self.tally = Tally()
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.next_sweep = time.perf_counter() + 0.1

    def start(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        start = time.perf_counter()
        code = s.connect_ex(self.addr)
        if code not in (0, errno.EINPROGRESS):
            s.close()
            self.tally.failed += 1
            return
        self.conns[s.fileno()] = Conn(s, start)
        self.ep.register(s.fileno(), select.EPOLLOUT)

    def finish(self, fd: int, ok: bool, now: float) -> None:
        c = self.conns.pop(fd)
        self.ep.unregister(fd)
        c.sock.close()
        if ok:
            self.tally.connect_us.append((c.connected - c.start) * 1e6)
            self.tally.response_us.append((now - c.start) * 1e6)
        else:
            self.tally.failed += 1

    def poll(self, wait: float) -> float:
        """Handle what is ready within `wait` seconds (at most 10 ms); the time after."""
        events = self.ep.poll(max(0.0, min(wait, 0.01)))
        now = time.perf_counter()
        for fd, ev in events:
            now = time.perf_counter()
            c = self.conns[fd]
            if not c.connected:
                if ev & (select.EPOLLERR | select.EPOLLHUP) or c.sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_ERROR
                ):
                    self.finish(fd, False, now)
                    continue
                c.connected = now
                try:
                    c.sock.send(REQUEST)
                except OSError:
                    self.finish(fd, False, now)
                    continue
                self.ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = c.sock.recv(65536)
            except OSError:
                self.finish(fd, False, now)
                continue
            if not data:
                self.finish(fd, True, now)
        if now >= self.next_sweep:
            self.next_sweep = now + 0.1
            for fd in [fd for fd, c in self.conns.items() if now - c.start > TIMEOUT]:
                self.finish(fd, False, now)
        return now

    def close(self) -> None:
        self.ep.close()


def paced(host: str, port: int, rate: float, seconds: float) -> tuple[Tally, int, float]:
    """Start connection i at i / rate seconds; returns the tally, how many were offered,
    and the time it all took (the last ones finish up to TIMEOUT after `seconds`)."""
    e = Engine(host, port)
    total = int(rate * seconds)
    begin = time.perf_counter()
    i = 0
    now = begin
    while i < total or e.conns:
        while i < total and begin + i / rate <= now:
            i += 1
            if len(e.conns) >= MAX_IN_FLIGHT:
                e.tally.skipped += 1
                continue
            e.start()
        now = e.poll((begin + i / rate - now) if i < total else 0.01)
    e.close()
    return e.tally, total, time.perf_counter() - begin


def counted(host: str, port: int, count: int, concurrency: int) -> tuple[Tally, int, float]:
    """Exactly `count` connections, `concurrency` at a time: the next starts as soon as
    one ends, however long that takes."""
    e = Engine(host, port)
    begin = time.perf_counter()
    started = 0
    while started < count or e.conns:
        while started < count and len(e.conns) < concurrency:
            started += 1
            e.start()
        e.poll(0.01)
    e.close()
    return e.tally, count, time.perf_counter() - begin


def main(argv: list[str]) -> int:
    host, port = argv[0], int(argv[1])
    if argv[2] == "--count":
        count = int(argv[3])
        concurrency = int(argv[5]) if argv[4:5] == ["--concurrency"] else 1
        tally, offered, took = counted(host, port, count, concurrency)
        rate = 0.0
    else:
        rate, seconds = float(argv[2]), float(argv[3])
        tally, offered, took = paced(host, port, rate, seconds)
    print(
        json.dumps(
            {
                "offered": offered,
                "rate": rate,
                "seconds": took,
                "completed": len(tally.connect_us),
                "failed": tally.failed,
                "skipped": tally.skipped,
                **{
                    f"{what}_p{q}_us": percentile(values, q) if values else None
                    for what, values in (
                        ("connect", tally.connect_us),
                        ("response", tally.response_us),
                    )
                    for q in (50, 99)
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
