"""Interleaved weighted round robin: ip_vs_wrr.c."""

from __future__ import annotations

from math import gcd

from lb.sched.base import Recomputing, Request, Target, blocked
from lb.sched.dest import Dest


def _gcd_weight(dests: list[Dest]) -> int:
    """ip_vs_wrr_gcd_weight(): the gcd of the positive weights, 1 if there are none."""
    return gcd(*(d.weight for d in dests if d.weight > 0)) or 1


class WeightedRoundRobin(Recomputing):
    """State: `cl` (cursor, None = head), `cw` (current weight), `mw`, `di`.

    Every add, edit and delete recomputes `di` (gcd of positive weights), `mw` (max weight
    less di - 1) and puts the cursor back at the head, but keeps `cw` where it can
    (ip_vs_wrr_dest_changed): the picks depend on the history of edits.
    """

    name = "wrr"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.cl: Dest | None = None
        self.di = _gcd_weight(target.dests)
        self.mw = max((d.weight for d in target.dests), default=0) - (self.di - 1)
        self.cw = self.mw

    def changed(self) -> None:
        dests = self.target.dests
        self.cl = None
        self.di = _gcd_weight(dests)
        self.mw = max((d.weight for d in dests), default=0) - (self.di - 1)
        if self.cw > self.mw or self.cw == 0:
            self.cw = self.mw
        elif self.di > 1:
            self.cw = (self.cw // self.di) * self.di + 1

    def schedule(self, req: Request) -> Dest | None:
        if self.mw == 0:
            return None
        dests = self.target.dests
        n = len(dests)
        last = self.cl
        i = -1 if last is None else dests.index(last)
        stop: Dest | None = None
        last_pass = restarted = False
        while True:
            # list_for_each_entry_continue: the entries after position i, up to the head.
            for j in range(i + 1, n):
                d = dests[j]
                if not blocked(d, req) and d.weight >= self.cw:
                    self.cl = d
                    return d
                if d is stop:
                    self.cl = d
                    return None
            i = -1  # back at the head
            self.cw -= self.di
            if self.cw <= 0:
                self.cw = self.mw
                # Stop once a pass at weight >= 1 covered every destination.
                if last_pass or last is None:
                    self.cl = None
                    return None
                restarted = True
            last_pass = self.cw <= self.di
            if last_pass and restarted and last is not None:
                # The first pass at weight >= 1 only saw the dests after `last`;
                # now see the ones up to it, then give up.
                stop = last
