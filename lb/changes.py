"""What changed in the desired services since the last apply, at the cost of the change.

Every dataplane is handed the whole desired list (`apply(desired)`: idempotent, easy to
test), and, from the controller down, `Changes`: which services are new or changed and
which keys left, as kube-proxy's change trackers tell its proxiers. The controller knows
them (it remade those services); each layer passes on what it changed in turn. A layer
given no `Changes` finds them itself by identity: the controller keeps an unchanged
service the very object it was, so dict and set operations in C find the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lb.model import Service, ServiceKey


@dataclass(frozen=True, slots=True)
class Changes:
    fresh: list[Service] = field(default_factory=list)  # new, or changed (new objects)
    removed: list[ServiceKey] = field(default_factory=list)  # no service has these keys now

    def __bool__(self) -> bool:
        return bool(self.fresh or self.removed)

    def touched(self) -> set[ServiceKey]:
        return {s.key for s in self.fresh} | set(self.removed)


class Applied:
    """The service objects of the last apply that went through, by identity and by key
    (held, so that their ids stay theirs)."""

    def __init__(self) -> None:
        self._by_id: dict[int, Service] = {}
        self._by_key: dict[ServiceKey, Service] = {}

    def changes(self, desired: Sequence[Service], given: Changes | None = None) -> Changes:
        """What changed from the last apply to `desired`: `given` (taken as true), else
        found by identity (a few C-level dict and set operations over the list)."""
        if given is not None:
            return given
        previous = self._by_id
        now = dict(zip(map(id, desired), desired, strict=True))
        fresh = [now[i] for i in now.keys() - previous.keys()]
        gone = {previous[i].key for i in previous.keys() - now.keys()}
        if gone:
            gone.difference_update(s.key for s in fresh)
        return Changes(fresh, sorted(gone, key=str))

    def commit(self, changes: Changes) -> None:
        """The apply of `changes` went through (the work: the change's)."""
        by_id, by_key = self._by_id, self._by_key
        for key in changes.removed:
            old = by_key.pop(key, None)
            if old is not None:
                by_id.pop(id(old), None)
        for s in changes.fresh:
            old = by_key.get(s.key)
            if old is not None:
                by_id.pop(id(old), None)
            by_key[s.key] = s
            by_id[id(s)] = s

    def clear(self) -> None:
        self._by_id = {}
        self._by_key = {}
