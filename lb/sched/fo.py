"""Weighted failover: ip_vs_fo.c."""

from __future__ import annotations

from lb.sched.base import Request, Scheduler, blocked
from lb.sched.dest import Dest


class WeightedFailover(Scheduler):
    """The destination of highest weight that is not overloaded, every time; a tie goes
    to the first in list order (the most recently added). No state of its own: a pick
    reads the list as it is, so edits take effect at the next pick."""

    name = "fo"

    def schedule(self, req: Request) -> Dest | None:
        best: Dest | None = None
        hw = 0  # weight 0 never wins: quiesced destinations get no new connections
        for d in self.target.dests:
            if not blocked(d, req) and d.weight > hw:
                best, hw = d, d.weight
        return best
