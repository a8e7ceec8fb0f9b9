"""What the reliability tier's scenarios share: its scale, the figures it reports, lb's
memory, and servers of the tests' own in the backend namespace.

Every scenario asserts a figure (connections failed, bytes lost, memory grown, seconds to
recover) and reports it with `figure()`: pytest prints them all at the end of the run
("reliability figures"). `LB_RELIABILITY_SCALE` multiplies the amounts (connections,
bytes, datagrams, reloads); 1, CI's bounded run, is the default."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.support.netns import LB_SIDE, Topology, socket_in

SCALE = float(os.environ.get("LB_RELIABILITY_SCALE", "1"))

#: every figure reported in this run, for the summary at its end (`report`)
FIGURES: list[str] = []


def scaled(n: int) -> int:
    """`n` at scale 1, proportionally more (or fewer) at another scale."""
    return max(1, round(n * SCALE))


def figure(text: str) -> None:
    """Report a scenario's figure: printed with the test's output and at the run's end."""
    FIGURES.append(text)
    print(text)


#: the tier's directories: this one, and the fuzzing's
TIER = (Path(__file__).parent, Path(__file__).parent.parent / "fuzz")


def mark(items: list[pytest.Item]) -> None:
    """Mark the tier's tests `reliability` (`-m reliability` runs the tier alone)."""
    for item in items:
        if any(d in Path(str(item.path)).parents for d in TIER):
            item.add_marker(pytest.mark.reliability)


def report(terminal: pytest.TerminalReporter) -> None:
    """The figures of this run, at its end (once, whichever conftest asks first)."""
    if FIGURES:
        terminal.section(f"reliability figures (LB_RELIABILITY_SCALE={SCALE:g})")
        for line in FIGURES:
            terminal.line(line)
        FIGURES.clear()


def seen_from(dataplane: str, client: str) -> str:
    """The address a backend sees a client's connection or datagram come from: the
    client's own through the kernel's NAT, lb's (LB_SIDE) through the userspace proxy. A
    scenario that names a kernel dataplane checks that the kernel did carry it."""
    return LB_SIDE if dataplane == "userspace" else client


def problem_file(path: Path, services: int) -> None:
    """A config whose every service listens where the first does: a problem on each of its
    lines (436,906 of them make the issue's 20 MB file)."""
    with path.open("w") as f:
        f.write("services:\n")
        for i in range(services):
            f.write(f"- {{name: service-{i:07d}, listen: '127.0.0.1:80'}}\n")


def rss_mb(pid: int) -> float:
    """The resident memory of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(topo: Topology, ip: str, port: int, handler: Handler) -> asyncio.Server:
    """A TCP server of the test's own on a backend address, in the backend namespace."""
    sock = socket_in(topo.backends)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))
    return await asyncio.start_server(handler, sock=sock, backlog=4096)


CHUNK = 256 * 1024


class Payload:
    """`size` bytes, the same for a given seed: eight random blocks of CHUNK bytes in a
    random order (cheap to make, and a lost, repeated or reordered chunk changes the
    SHA-256 the sender and the receiver compare)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        rng = random.Random(seed)
        self.blocks = [rng.randbytes(CHUNK) for _ in range(8)]
        self.order = [rng.randrange(8) for _ in range(-(-size // CHUNK))]

    async def send(self, writer: asyncio.StreamWriter) -> str:
        """Write it all under flow control, then half-close; its SHA-256."""
        h, left = hashlib.sha256(), self.size
        for i in self.order:
            chunk = self.blocks[i][: min(CHUNK, left)]
            left -= len(chunk)
            h.update(chunk)
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        return h.hexdigest()


async def drain_to_eof(
    reader: asyncio.StreamReader, pace: float = 0.0, timeout: float = 30.0
) -> tuple[int, str]:
    """Read until the peer's FIN: (bytes, SHA-256). `pace`: a pause after each read, to
    be a slow reader."""
    h, n = hashlib.sha256(), 0
    while data := await asyncio.wait_for(reader.read(CHUNK), timeout):
        h.update(data)
        n += len(data)
        if pace:
            await asyncio.sleep(pace)
    return n, h.hexdigest()
