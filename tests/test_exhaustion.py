"""Out of descriptors is a state, not a crash (issue 20, defect 5).

Before: with `ulimit -n 512` and 600 new UDP clients, the datagram callback raised
EMFILE tracebacks, and the health checks of every backend died for good (a backend taken
down stayed UP). Now new work is refused and counted, checks go on, and lb recovers.
"""

from __future__ import annotations

import asyncio
import errno
import json
import signal
import socket
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from lb.exhaustion import RESERVE_MIN, Descriptors, Exhaustion
from lb.health import probes
from lb.health.monitor import Monitor
from lb.health.probes import CannotProbe, tcp_probe
from lb.model import CheckKind, Endpoint, HealthCheck
from tests.support.net import TcpBackend, UdpBackend, eventually, free_port, http_get
from tests.support.proc import LbProcess

TARGET = Endpoint.parse("127.0.0.1:9")


def emfile(*args: object, **kwargs: object) -> socket.socket:
    raise OSError(errno.EMFILE, "Too many open files")


async def test_a_probe_without_descriptors_cannot_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = SimpleNamespace(socket=emfile, AF_INET=socket.AF_INET, SOCK_STREAM=socket.SOCK_STREAM)
    monkeypatch.setattr(probes, "socket", fake)
    with pytest.raises(CannotProbe) as e:
        await tcp_probe(TARGET, 1.0)
    assert e.value.resource == "descriptors" and e.value.reason == "too many open files"


class Script:
    """A probe whose outcome the test sets: True, False, or an exception to raise."""

    def __init__(self) -> None:
        self.outcome: bool | BaseException = True
        self.calls = 0

    async def __call__(self, *args: object) -> tuple[bool, str]:
        self.calls += 1
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome, "scripted"


async def test_unprobed_checks_hold_the_state_for_fall_intervals_then_count_as_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lb.health.monitor as monitor_module

    script = Script()
    monkeypatch.setattr(monitor_module, "probe", script)
    loop = asyncio.get_running_loop()
    changes: list[tuple[float, bool]] = []
    check = HealthCheck(CheckKind.TCP, 0.05, 0.05, 1, 3)
    async with aiohttp.ClientSession() as session:
        m = Monitor("web", TARGET, check, session, lambda up, _: changes.append((loop.time(), up)))
        m.start()
        try:
            await eventually(lambda: script.calls >= 3)
            assert m.up
            script.outcome = CannotProbe("descriptors", "too many open files")
            blind = loop.time()
            while not changes:
                await asyncio.sleep(0.01)
                assert loop.time() - blind < 5, "never went DOWN while unable to probe"
            at, up = changes[0]
            assert not up
            assert at - blind >= check.fall * check.interval - 0.05  # held meanwhile
            assert m.unprobed >= check.fall
            assert m.last_reason == "cannot probe: too many open files"
            script.outcome = True  # descriptors are back: checks go on by themselves
            while len(changes) < 2:
                await asyncio.sleep(0.01)
                assert loop.time() - blind < 10, "never came back UP"
            assert changes[1][1] and m.up and m.unprobed_since is None
        finally:
            await m.stop()


async def test_a_probe_that_raises_does_not_end_checking(monkeypatch: pytest.MonkeyPatch) -> None:
    import lb.health.monitor as monitor_module

    script = Script()
    script.outcome = RuntimeError("a bug")
    monkeypatch.setattr(monitor_module, "probe", script)
    check = HealthCheck(CheckKind.TCP, 0.02, 0.02, 1, 1)
    async with aiohttp.ClientSession() as session:
        m = Monitor("web", TARGET, check, session, lambda up, _: None)
        m.start()
        await eventually(lambda: script.calls >= 3)
        assert m.unprobed >= 3 and not m.up  # counted as failed past the hold
        script.outcome = False  # and the loop is still there to run real probes
        calls = script.calls
        await eventually(lambda: script.calls >= calls + 3)
        assert m.unprobed_since is None and m.last_reason == "scripted"
        await m.stop()  # no exception from a dead task


def test_exhaustion_is_counted_always_and_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    e = Exhaustion()
    with caplog.at_level("ERROR", logger="lb.exhaustion"):
        for t in range(5):
            e.note("descriptors", "a new udp flow of dns", now=100.0 + t)
        e.note("descriptors", "a new udp flow of dns", now=111.0)
    assert e.counts == {"descriptors": 6, "memory": 0}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "(and 4 more since the last report)" in messages[1]


def test_the_data_path_budget_leaves_lb_its_own_descriptors_and_a_reserve() -> None:
    d = Descriptors()
    assert d.take(10**6)  # not sized yet: no budget
    d.give(10**6)
    d.size(soft_limit=128, open_now=30)  # 30 held by lb itself: listeners, loop, logs
    assert d.limit == 128 - 30 - RESERVE_MIN
    relays = 0
    while d.take(2):
        relays += 1
    assert relays == (128 - 30 - RESERVE_MIN) // 2 and d.in_use == 2 * relays
    d.give(2)
    assert d.take(2) and not d.take(2)
    # sized again while relays are open: what they hold is not counted as lb's own
    d.size(soft_limit=128, open_now=30 + d.in_use)
    assert d.limit == 128 - 30 - RESERVE_MIN
    d.size(soft_limit=65536, open_now=100 + d.in_use)  # a large limit keeps a sixteenth
    assert d.limit == 65536 - 100 - 4096


LIMIT = 100  # descriptors for the whole lb process: a few dozen UDP flows exhaust them


async def test_lb_under_descriptor_exhaustion_refuses_counts_and_keeps_checking(
    tmp_path: Path,
) -> None:
    a, b = await TcpBackend("A").start(), await TcpBackend("B").start()
    dns = await UdpBackend("D").start()
    web, udp, admin = free_port(), free_port(kind=socket.SOCK_DGRAM), free_port()
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(f"""\
admin: {{listen: 127.0.0.1:{admin}}}
shutdown_grace: 1s
services:
- name: web
  listen: 127.0.0.1:{web}
  scheduler: rr
  health_check: {{type: tcp, interval: 200ms, timeout: 100ms, rise: 1, fall: 2}}
  backends: [{{address: {a.address}}}, {{address: {b.address}}}]
- name: dns
  protocol: udp
  listen: 127.0.0.1:{udp}
  idle_timeout: 2s
  backends: [{{address: {dns.address}}}]
""")
    lb = await LbProcess.start(cfg, prefix=["prlimit", f"--nofile={LIMIT}:{LIMIT}", "--"])
    clients: list[socket.socket] = []
    try:
        await lb.wait_event("lb.started")
        for _ in range(2 * LIMIT):  # each new client is a flow, each flow a descriptor
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.sendto(b"q", ("127.0.0.1", udp))
            clients.append(c)
        exhausted = await lb.wait_event("resource.exhausted", timeout=10)
        assert exhausted["resource"] == "descriptors"
        await b.stop()  # B goes away while lb has no descriptor to spare
        await health(lb, b.address, "DOWN")
        # the flows expire, descriptors come back: lb serves new work by itself; A was
        # probed throughout (the data path's budget leaves probes a reserve), never DOWN
        await asyncio.sleep(2.5)
        assert not [
            e for e in lb.events if e["event"] == "backend.health" and a.address in e["msg"]
        ]
        reader, writer = await asyncio.open_connection("127.0.0.1", web)
        assert await asyncio.wait_for(reader.readline(), 5) == b"A\n"
        writer.close()
        metrics = (await http_get(admin, "/metrics"))[1].decode()
        (line,) = [
            x
            for x in metrics.splitlines()
            if x.startswith('lb_resource_exhausted_total{resource="descriptors"}')
        ]
        assert float(line.split()[-1]) >= 1
        errors = json.loads((await http_get(admin, "/api/v1/services/dns"))[1])
        assert "exhausted" in json.dumps(errors)
        lb.signal(signal.SIGTERM)
        assert await lb.wait(timeout=15) == 0
        assert not [line for line in lb.lines if "Traceback" in line], lb.lines
    finally:
        for c in clients:
            c.close()
        await lb.stop()
        await a.stop()
        dns.stop()


async def health(lb: LbProcess, backend: str, state: str, timeout: float = 20) -> None:
    """Wait for the latest health event of `backend` to say `state`."""

    def latest() -> str | None:
        said = [
            e["msg"]
            for e in lb.events
            if e.get("event") == "backend.health" and f"backend {backend} " in e["msg"]
        ]
        return said[-1] if said else None

    try:
        await eventually(lambda: f" is {state}" in (latest() or ""), timeout=timeout)
    except AssertionError:
        raise AssertionError(f"{backend} not {state}: {latest()}") from None
