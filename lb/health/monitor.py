"""Runs the checks of one backend and reports UP/DOWN transitions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from lb.health.probes import probe
from lb.health.state import CheckState
from lb.model import Endpoint, HealthCheck


class Monitor:
    """Probe `target` every `check.interval`; call `on_change(up, reason)` on transitions."""

    def __init__(
        self,
        service: str,
        target: Endpoint,
        check: HealthCheck,
        session: aiohttp.ClientSession,
        on_change: Callable[[bool, str], None],
    ) -> None:
        self.service = service
        self.target = target
        self.check = check
        self.session = session
        self.on_change = on_change
        self.state = CheckState.initial(check.rise, check.fall)
        self.last_reason = ""
        self.checks = 0  # probes run
        self.failures = 0  # probes failed
        self.went_up = 0  # transitions to UP
        self.went_down = 0  # transitions to DOWN
        self._task: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self.state.up

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def restart_fresh(self) -> None:
        """Leaving maintenance: start over as at start-up."""
        self.state = CheckState.initial(self.check.rise, self.check.fall)

    def retune(self, check: HealthCheck) -> None:
        """A reload changed the check: keep the current health, use the new parameters."""
        self.check = check
        self.state = self.state.retune(check.rise, check.fall)

    async def _run(self) -> None:
        while True:
            ok, reason = await probe(self.check, self.target, self.session)
            was_up = self.state.up
            self.state = self.state.observe(ok)
            self.last_reason = reason
            self.checks += 1
            self.failures += not ok
            if self.state.up != was_up:
                if self.state.up:
                    self.went_up += 1
                else:
                    self.went_down += 1
                self.on_change(self.state.up, reason)
            await asyncio.sleep(self.check.interval)
