"""New connections at a fixed rate, for connect latency at a given load (wrk2 is not in
Debian; wrk only runs flat out).

`python -m bench.loadgen HOST PORT RATE SECONDS` opens RATE connections per second for
SECONDS (a bounded run: it stops by itself), each sending one `Connection: close` HTTP
request and reading the response to its end, and prints one JSON line: connections
offered, completed and failed, and the p50/p99 connect and response times (microseconds,
from the connect call) of the completed ones. Started inside the client's namespace by
bench/workloads.py.

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


def paced(host: str, port: int, rate: float, seconds: float) -> tuple[Tally, int, float]:
    """Start connection i at i / rate seconds; returns the tally, how many were offered,
    and the time it all took (the last ones finish up to TIMEOUT after `seconds`)."""
    tally = Tally()
    ep = select.epoll()
    conns: dict[int, Conn] = {}
    total = int(rate * seconds)
    begin = time.perf_counter()
    i = 0
    next_sweep = begin + 0.1

    def finish(fd: int, ok: bool, now: float) -> None:
        c = conns.pop(fd)
        ep.unregister(fd)
        c.sock.close()
        if ok:
            tally.connect_us.append((c.connected - c.start) * 1e6)
            tally.response_us.append((now - c.start) * 1e6)
        else:
            tally.failed += 1

    while i < total or conns:
        now = time.perf_counter()
        while i < total and begin + i / rate <= now:
            i += 1
            if len(conns) >= MAX_IN_FLIGHT:
                tally.skipped += 1
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            start = time.perf_counter()
            code = s.connect_ex((host, port))
            if code not in (0, errno.EINPROGRESS):
                s.close()
                tally.failed += 1
                continue
            conns[s.fileno()] = Conn(s, start)
            ep.register(s.fileno(), select.EPOLLOUT)
        wait = (begin + i / rate - now) if i < total else 0.01
        for fd, ev in ep.poll(max(0.0, min(wait, 0.01))):
            now = time.perf_counter()
            c = conns[fd]
            if not c.connected:
                if ev & (select.EPOLLERR | select.EPOLLHUP) or c.sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_ERROR
                ):
                    finish(fd, False, now)
                    continue
                c.connected = now
                try:
                    c.sock.send(REQUEST)
                except OSError:
                    finish(fd, False, now)
                    continue
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = c.sock.recv(65536)
            except OSError:
                finish(fd, False, now)
                continue
            if not data:
                finish(fd, True, now)
        if now >= next_sweep:
            next_sweep = now + 0.1
            for fd in [fd for fd, c in conns.items() if now - c.start > TIMEOUT]:
                finish(fd, False, now)
    ep.close()
    return tally, total, time.perf_counter() - begin


def main(argv: list[str]) -> int:
    host, port, rate, seconds = argv[0], int(argv[1]), float(argv[2]), float(argv[3])
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
