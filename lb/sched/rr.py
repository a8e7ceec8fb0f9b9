"""Round robin: ip_vs_rr.c."""

from __future__ import annotations

from lb.sched.base import Request, Scheduler, Target, blocked
from lb.sched.dest import Dest


class RoundRobin(Scheduler):
    """A cursor into the list, starting at the head.

    A pick walks forward from the cursor to the next available destination, wrapping once.
    Adding a destination leaves the cursor alone; deleting the one under the cursor moves
    the cursor back to its predecessor (ip_vs_rr_del_dest).
    """

    name = "rr"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.cursor: Dest | None = None  # None: the list head

    def del_dest(self, dest: Dest, index: int) -> None:
        if self.cursor is dest:
            self.cursor = self.target.dests[index - 1] if index > 0 else None

    def schedule(self, req: Request) -> Dest | None:
        dests = self.target.dests
        n = len(dests)
        order: tuple[int, ...] | range
        if self.cursor is None:
            order = range(n)
        else:
            start = dests.index(self.cursor) + 1
            order = (*range(start, n), *range(start))
        for i in order:
            d = dests[i]
            if not blocked(d, req) and d.weight > 0:
                self.cursor = d
                return d
        return None
