"""Runs the checks of one backend and reports UP/DOWN transitions.

A probe that cannot run (lb is out of descriptors or memory: CannotProbe) says nothing
of the backend, so the last state holds, but not forever: once probes have been unable
to run for `fall` intervals, each further one counts as a failed check, so a backend that
went down meanwhile is DOWN within about 2 x fall x interval. The loop never ends on an
error: a probe that raises is logged and counted like one that cannot run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

from lb.exhaustion import EXHAUSTION
from lb.health.probes import CannotProbe, probe
from lb.health.state import CheckState
from lb.model import Endpoint, HealthCheck

log = logging.getLogger("lb.health")


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
        self.unprobed = 0  # probes that could not run
        self.unprobed_since: float | None = None  # since when none could
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
        loop = asyncio.get_running_loop()
        while True:
            try:
                ok, reason = await probe(self.check, self.target, self.session)
                self.unprobed_since = None
                self._observe(ok, reason)
            except CannotProbe as e:
                EXHAUSTION.note(e.resource, f"a health check of {self.target} ({self.service})")
                self._unprobed(loop.time(), f"cannot probe: {e.reason}")
            except Exception as e:  # a bug must not end checking, and so freeze the state
                log.exception("health check of %s (%s) failed", self.target, self.service)
                self._unprobed(loop.time(), f"cannot probe: {type(e).__name__}: {e}")
            await asyncio.sleep(self.check.interval)

    def _unprobed(self, now: float, reason: str) -> None:
        """Hold the last state for `fall` intervals, then count as a failed check."""
        self.unprobed += 1
        if self.unprobed_since is None:
            self.unprobed_since = now
        self.last_reason = reason
        if now - self.unprobed_since >= self.check.fall * self.check.interval:
            self._observe(False, reason)

    def _observe(self, ok: bool, reason: str) -> None:
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
