"""Run the real `lb` command in a subprocess and watch what it says."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: How long a one-shot command (`lb cleanup`, `lb list`) may take: in the kernel tier's VM,
#: which emulates its CPU, Python imports alone take some 70 times as long as on the host.
CLI_TIMEOUT = 150.0


class LbProcess:
    def __init__(self, proc: asyncio.subprocess.Process, pid_file: Path) -> None:
        self.proc = proc
        self.pid_file = pid_file
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(
        cls, config: Path, *, prefix: Sequence[str] = (), args: Sequence[str] = ()
    ) -> LbProcess:
        pid_file = config.with_suffix(".pid")
        proc = await asyncio.create_subprocess_exec(
            *prefix,
            sys.executable,
            "-m",
            "lb",
            "run",
            "-c",
            str(config),
            "--pid-file",
            str(pid_file),
            "--log-format",
            "json",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return cls(proc, pid_file)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode().rstrip()
            self.lines.append(text)
            try:
                event = json.loads(text)
            except ValueError:
                continue
            event["_seen"] = time.monotonic()  # when the test saw it, to line up with clients
            self.events.append(event)

    def timeline(self, since: float) -> str:
        """The events seen so far, each with its time since `since` (time.monotonic())."""
        return "\n".join(
            f"{e['_seen'] - since:7.2f}s {e.get('event')}: {e.get('msg', '')}" for e in self.events
        )

    async def wait_event(self, name: str, timeout: float = 30.0, after: int = 0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for e in self.events[after:]:
                if e.get("event") == name:
                    return e
            if self.proc.returncode is not None and self._reader.done():
                raise AssertionError(
                    f"lb exited ({self.proc.returncode}) without {name}: {self.lines}"
                )
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no {name} event within {timeout}s: {self.lines}")
            await asyncio.sleep(0.02)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 15.0) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, 5)
        return code

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        self._reader.cancel()


async def run_cli(*args: str, prefix: Sequence[str] = ()) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        sys.executable,
        "-m",
        "lb",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
