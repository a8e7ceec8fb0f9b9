"""What changed in the desired services since the last apply, at the cost of the change.

The one way changes travel between layers, as kube-proxy's change trackers tell its
proxiers: the controller is the tracker (it remakes only the services a config, a health
check or an edit touched, and knows which keys left), and every dataplane's
`apply(desired, changes)` is handed the whole desired list (what it must carry) and the
`Changes` from the last apply that went through (the work to do). A layer passes on what
it changed in turn (the offload manager hands the kernel the forms it remade). Nobody
diffs the whole list to find them: an edit costs one service at any size. A kernel
dataplane whose last apply failed does not trust `changes` for what it missed: it
rebuilds or reconciles whole on the next apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lb.model import Service, ServiceKey


@dataclass(frozen=True, slots=True)
class Changes:
    fresh: list[Service] = field(default_factory=list)  # new, or changed
    removed: list[ServiceKey] = field(default_factory=list)  # no service has these keys now

    def __bool__(self) -> bool:
        return bool(self.fresh or self.removed)

    def touched(self) -> set[ServiceKey]:
        return {s.key for s in self.fresh} | set(self.removed)

    @classmethod
    def between(cls, before: Iterable[Service], after: Sequence[Service]) -> Changes:
        """The changes from `before` to `after`, by key and equality: a whole-list diff,
        for a caller with no tracker (a one-off apply, a test); the controller never
        needs it."""
        old = {s.key: s for s in before}
        keys = {s.key for s in after}
        return cls(
            [s for s in after if old.get(s.key) != s],
            sorted((k for k in old if k not in keys), key=str),
        )
