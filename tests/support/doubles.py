"""Test doubles of lb's own interfaces."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Protocol

from lb.changes import Changes
from lb.model import Service, ServiceKey
from lb.stats import Offload, ServiceSnapshot


class Applies(Protocol):
    async def apply(self, desired: list[Service], changes: Changes) -> None: ...


_given: weakref.WeakKeyDictionary[Applies, list[Service]] = weakref.WeakKeyDictionary()


async def apply_diff(dp: Applies, desired: Sequence[Service]) -> None:
    """`dp.apply(desired, changes)` with the changes from what this helper gave `dp`
    last (a whole-list diff: a test's change tracker, where lb's is the controller)."""
    now = list(desired)
    await dp.apply(now, Changes.between(_given.get(dp, []), now))
    _given[dp] = now


class RecordingDataplane:
    """A dataplane that keeps what it was given: each desired state and its `Changes`."""

    name = "recorder"

    def __init__(self) -> None:
        self.applied: list[list[Service]] = []
        self.changes: list[Changes] = []

    async def apply(self, desired: list[Service], changes: Changes) -> None:
        self.applied.append(list(desired))
        self.changes.append(changes)

    def observe(self, only: ServiceKey | None = None) -> list[ServiceSnapshot]:
        return []

    def explain(self, key: ServiceKey) -> Offload | None:
        return None

    def kernel_note(self) -> str | None:
        return None

    async def close(self, grace: float) -> None:
        pass
