"""A reload of a hostile file never stops the traffic (issue 20, defect 1).

Before the loader was bounded and moved off the event loop, SIGHUP with a 446-byte alias
bomb made `lb run` spin: 2,000 of 2,000 new connections failed, the admin API stopped
answering and only SIGKILL ended it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from tests.support.net import TcpBackend, free_port, http_get, read_line
from tests.support.proc import LbProcess
from tests.test_hostile_config import alias_bomb, merge_bomb


def config(port: int, admin: int, backend: str) -> str:
    return f"""\
admin: {{listen: 127.0.0.1:{admin}}}
shutdown_grace: 2s
services:
- name: web
  listen: 127.0.0.1:{port}
  scheduler: rr
  backends: [{{address: {backend}}}]
"""


async def test_a_bomb_sent_by_reload_leaves_traffic_admin_and_signals_alone(
    tmp_path: Path,
) -> None:
    backend = await TcpBackend("A").start()
    port, admin = free_port(), free_port()
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config(port, admin, backend.address))
    lb = await LbProcess.start(cfg)
    try:
        await lb.wait_event("lb.started")
        for bomb in (alias_bomb(9), merge_bomb(30), "services: &a [*a]\n"):
            cfg.write_text(bomb)
            n = len(lb.events)
            lb.signal(signal.SIGHUP)
            # while the reload runs and after it: every connection served, admin answers
            served = [await read_line("127.0.0.1", port) for _ in range(20)]
            assert served == ["A"] * 20
            assert (await http_get(admin, "/healthz"))[0] == 200
            rejected = await lb.wait_event("config.reload_rejected", after=n, timeout=30)
            assert "the current config serves on" in rejected["msg"]
            invalid = await lb.wait_event("config.invalid", after=n)
            assert "alias" in invalid["msg"], invalid
        cfg.write_text(alias_bomb(9))
        lb.signal(signal.SIGHUP)
        started = time.monotonic()
        lb.signal(signal.SIGTERM)  # honoured at once, whatever the reload is doing
        assert await lb.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert not [line for line in lb.lines if "Traceback" in line]
    finally:
        await lb.stop()
        await backend.stop()


async def test_a_sighup_during_a_reload_reloads_again(tmp_path: Path) -> None:
    """The file may change after the running reload read it: the last SIGHUP wins."""
    a, b = await TcpBackend("A").start(), await TcpBackend("B").start()
    port, admin = free_port(), free_port()
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config(port, admin, a.address))
    lb = await LbProcess.start(cfg)
    try:
        await lb.wait_event("lb.started")
        n = len(lb.events)
        lb.signal(signal.SIGHUP)  # reads A's config again
        cfg.write_text(config(port, admin, b.address))
        lb.signal(signal.SIGHUP)  # arrives while the first reload's child runs
        deadline = time.monotonic() + 20
        while await read_line("127.0.0.1", port) != "B":
            assert time.monotonic() < deadline, "\n".join(lb.lines[-6:])
            await asyncio.sleep(0.1)
        assert sum(e.get("event") == "config.reloaded" for e in lb.events[n:]) >= 1
    finally:
        await lb.stop()
        await a.stop()
        await b.stop()
