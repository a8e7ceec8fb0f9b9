"""Test doubles of lb's own interfaces."""

from __future__ import annotations

from lb.changes import Changes
from lb.model import Service, ServiceKey
from lb.stats import Offload, ServiceSnapshot


class RecordingDataplane:
    """A dataplane that keeps what it was given: each desired state and its `Changes`."""

    name = "recorder"

    def __init__(self) -> None:
        self.applied: list[list[Service]] = []
        self.changes: list[Changes | None] = []

    async def apply(self, desired: list[Service], changes: Changes | None = None) -> None:
        self.applied.append(list(desired))
        self.changes.append(changes)

    def observe(self, only: ServiceKey | None = None) -> list[ServiceSnapshot]:
        return []

    def explain(self, key: ServiceKey) -> Offload | None:
        return None

    async def close(self, grace: float) -> None:
        pass
