"""The connection-counting schedulers: lc, wlc, sed, nq (ip_vs_{lc,wlc,sed,nq}.c).

They read the live counts on each destination. Ratios are compared by
cross-multiplication as the kernel does (no floats); ties go to the earlier destination
in list order.
"""

from __future__ import annotations

from lb.sched.base import Request, Scheduler, blocked
from lb.sched.dest import Dest


class LeastConnection(Scheduler):
    """Least `active * 256 + inactive`; weight is only a 0 / non-0 switch."""

    name = "lc"

    def schedule(self, req: Request) -> Dest | None:
        least: Dest | None = None
        loh = 0
        for d in self.target.dests:
            if blocked(d, req) or d.weight == 0:
                continue
            doh = d.overhead()
            if least is None or doh < loh:
                least, loh = d, doh
        return least


class WeightedLeastConnection(Scheduler):
    """Least overhead / weight, starting from the first available destination."""

    name = "wlc"

    @staticmethod
    def cost(d: Dest) -> int:
        return d.overhead()

    def schedule(self, req: Request) -> Dest | None:
        it = iter(self.target.dests)
        for d in it:
            if not blocked(d, req) and d.weight > 0:
                least, loh = d, self.cost(d)
                break
        else:
            return None
        # The kernel's second loop skips only overloaded dests: a weight-0 dest can
        # never win since loh * 0 > doh * w is false.
        for d in it:
            if blocked(d, req):
                continue
            doh = self.cost(d)
            if loh * d.weight > doh * least.weight:
                least, loh = d, doh
        return least


class ShortestExpectedDelay(WeightedLeastConnection):
    """Like wlc with overhead = active + 1 (inactive connections are ignored)."""

    name = "sed"

    @staticmethod
    def cost(d: Dest) -> int:
        return d.active + 1


class NeverQueue(Scheduler):
    """The first idle destination (no active connections) in list order, else as sed."""

    name = "nq"

    def schedule(self, req: Request) -> Dest | None:
        least: Dest | None = None
        loh = 0
        for d in self.target.dests:
            if blocked(d, req) or not d.weight:
                continue
            doh = d.active + 1
            if d.active == 0:
                return d
            if least is None or loh * d.weight > doh * least.weight:
                least, loh = d, doh
        return least
