"""Promote to IPVS and demote back under continuous client load: zero failed connections,
zero lost bytes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from tests.netns import Topology
from tests.traffic import (
    LB_SIDE,
    Backends,
    client_conn,
    config_yaml,
    running_lb,
    service_yaml,
)

BACKENDS = [
    "{address: 10.99.2.2:8080, weight: W}",
    "{address: 10.99.2.3:8080}",
    "{address: 10.99.2.4:8080}",
]


def config(weight: int) -> str:
    web = service_yaml(
        "web",
        80,
        [b.replace("W", str(weight)) for b in BACKENDS],
        "    scheduler: wrr\n    retries: 0\n",
    )
    return config_yaml(
        [web], "auto", "offload: {hold_down: 5s, churn_limit: 3, drain_timeout: 60s}\n"
    )


class Load:
    """Clients opening short connections in a loop, each checking its echo byte for byte."""

    def __init__(self, topo: Topology, workers: int = 3) -> None:
        self.topo = topo
        self.workers = workers
        self.ok = 0
        self.failed: list[str] = []
        self.paths: list[str] = []  # "kernel" (the backend saw the client) or "userspace"
        self.started = time.monotonic()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.get_running_loop().create_task(self._worker(i)) for i in range(self.workers)
        ]

    async def _worker(self, i: int) -> None:
        source = self.topo.client_ips[i]
        while not self._stop.is_set():
            payload = os.urandom(4096)
            stage = "connect"
            began = time.monotonic() - self.started
            try:
                reader, writer = await client_conn(self.topo, source)
                stage = "greeting"
                line = (await asyncio.wait_for(reader.readline(), 10)).decode()
                writer.write(payload)
                stage = "echo"
                echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
                writer.close()
                if echoed != payload:
                    self.failed.append("corrupted echo")
                    continue
                self.paths.append("userspace" if line.split()[-1] == LB_SIDE else "kernel")
                self.ok += 1
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                self.failed.append(
                    f"{source} began at {began:.2f}s, {stage}: {type(e).__name__}: {e}"
                )

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


class Stream:
    """A long-lived connection that keeps sending and checks every byte that comes back."""

    def __init__(self, topo: Topology, source: str) -> None:
        self.topo = topo
        self.source = source
        self.sent = self.received = 0
        self.error: str | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            reader, writer = await client_conn(self.topo, self.source)
            await reader.readline()
            n = 0
            while not self._stop.is_set():
                chunk = bytes([n % 251]) * 2048
                writer.write(chunk)
                self.sent += len(chunk)
                back = await asyncio.wait_for(reader.readexactly(len(chunk)), 10)
                if back != chunk:
                    self.error = "corrupted"
                    return
                self.received += len(back)
                n += 1
                await asyncio.sleep(0.05)
            writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            self.error = f"{type(e).__name__}: {e}"

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def test_promote_and_demote_under_load_lose_nothing(
    topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(config(1))
    async with running_lb(topo, cfg) as lb:
        load = Load(topo)
        load.start()
        in_user = Stream(topo, topo.client_ips[10])  # opened while userspace carries the service
        in_user.start()
        await lb.wait_event("offload.promote", timeout=60)
        await asyncio.sleep(2)
        in_kernel = Stream(topo, topo.client_ips[11])  # opened while the kernel carries it
        in_kernel.start()
        await asyncio.sleep(2)
        await in_user.stop()  # the userspace connection lived through the promotion
        # churn: three changes within hold_down send the service back to userspace
        n = len(lb.events)
        for weight in (2, 3, 4):
            cfg.write_text(config(weight))
            lb.signal(signal.SIGHUP)
            await lb.wait_event("config.reloaded", after=n)
            n = len(lb.events)
        await lb.wait_event("offload.demote", timeout=30)
        await asyncio.sleep(2)
        await in_kernel.stop()  # the kernel connection lived through the demotion
        await lb.wait_event("offload.demoted", timeout=60)
        await asyncio.sleep(1)
        n = len(lb.events)
        await lb.wait_event("offload.promote", timeout=60, after=n)  # calm again
        await asyncio.sleep(2)
        await load.stop()
    assert load.failed == [], "\n".join(load.failed[:5]) + "\n" + lb.timeline(load.started)
    assert in_user.error is None and in_user.sent == in_user.received > 0
    assert in_kernel.error is None and in_kernel.sent == in_kernel.received > 0
    assert load.ok > 50
    # both paths carried traffic, and the last connections went through the kernel again
    assert "userspace" in load.paths and "kernel" in load.paths and load.paths[-1] == "kernel"
