"""Source and destination hashing: ip_vs_sh.c and ip_vs_dh.c (256-bucket tables)."""

from __future__ import annotations

from collections.abc import Iterator

from lb.model import SchedFlag
from lb.sched.base import Recomputing, Request, Target, hashed_pick, unavailable
from lb.sched.dest import Dest

TAB_BITS = 8
TAB_SIZE = 1 << TAB_BITS
TAB_MASK = TAB_SIZE - 1
GOLDEN_RATIO_32 = 0x61C88647


def hash_32(value: int, bits: int = TAB_BITS) -> int:
    """The kernel's hash_32(): multiplicative hashing, the top `bits` bits."""
    return ((value * GOLDEN_RATIO_32) & 0xFFFFFFFF) >> (32 - bits)


class SourceHash(Recomputing):
    """Each destination takes `weight` consecutive buckets (at least one, even at weight 0),
    walking the list round and round until all 256 are filled; rebuilt on every change,
    so it is not consistent hashing."""

    name = "sh"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.table: list[Dest | None] = [None] * TAB_SIZE
        self.changed()

    def changed(self) -> None:
        """ip_vs_sh_reassign()"""
        dests = self.target.dests
        if not dests:
            self.table = [None] * TAB_SIZE
            return
        table: list[Dest | None] = []
        i = count = 0
        for _ in range(TAB_SIZE):
            d = dests[i]
            table.append(d)
            count += 1
            if count >= d.weight:
                i = (i + 1) % len(dests)
                count = 0
        self.table = table

    def bucket(self, req: Request) -> int:
        port = req.src_port if SchedFlag.PORT in self.target.flags else 0
        return hash_32((port + req.src_fold) & 0xFFFFFFFF)

    def schedule(self, req: Request) -> Dest | None:
        ihash = self.bucket(req)
        table = self.table

        def probes() -> Iterator[Dest | None]:
            # ip_vs_sh_get_fallback(): the probe offset is added to the hash key *and* to
            # the start bucket, so probe k looks at bucket (k + 2 * ihash) mod 256.
            for offset in range(TAB_SIZE):
                yield table[((offset + ihash) % TAB_SIZE + ihash) & TAB_MASK]

        return hashed_pick(table[ihash], req, SchedFlag.FALLBACK in self.target.flags, probes)


class DestinationHash(Recomputing):
    """One bucket per destination in turn; the key is the packet's *destination* address,
    which for a service is always its VIP (dh is meant for fwmark cache clusters)."""

    name = "dh"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.table: list[Dest | None] = [None] * TAB_SIZE
        self.changed()

    def changed(self) -> None:
        """ip_vs_dh_reassign()"""
        dests = self.target.dests
        self.table = (
            [dests[i % len(dests)] for i in range(TAB_SIZE)] if dests else [None] * TAB_SIZE
        )

    def upd_dest(self, dest: Dest) -> None:
        """The kernel module has no upd_dest hook: weight edits leave the table alone."""

    def schedule(self, req: Request) -> Dest | None:
        d = self.table[hash_32(self.target.vip_fold)]
        if d is None or unavailable(d, req):
            return None
        return d
