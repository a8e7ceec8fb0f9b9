"""What changed in a list of services since the last one, at the cost of the change.

The controller hands every dataplane the whole desired list each time, but keeps each
unchanged service the very object it was (lb.controller). So what changed is found by
identity, with dict and set operations that run in C: a few hundred microseconds at
10,000 services, then Python work only for the services that changed.
"""

from __future__ import annotations

from collections.abc import Sequence

from lb.model import Service, ServiceKey


class Applied:
    """The service objects of the last list (held, so that their ids stay theirs)."""

    def __init__(self) -> None:
        self._by_id: dict[int, Service] = {}

    def changes(self, desired: Sequence[Service]) -> tuple[list[Service], list[ServiceKey]]:
        """The services of `desired` that are not objects of the last list (new or
        changed), and the keys of the last list that no service of `desired` has."""
        previous = self._by_id
        now = dict(zip(map(id, desired), desired, strict=True))
        fresh = [now[i] for i in now.keys() - previous.keys()]
        gone = {previous[i].key for i in previous.keys() - now.keys()}
        self._by_id = now
        if gone:
            gone.difference_update(s.key for s in fresh)
        return fresh, sorted(gone, key=str)

    def clear(self) -> None:
        self._by_id = {}
