"""Maglev hashing: ip_vs_mh.c (a 4093-slot lookup table from per-destination permutations)."""

from __future__ import annotations

from collections.abc import Iterator
from math import gcd

from lb.model import SchedFlag
from lb.sched.base import Recomputing, Request, Target, hashed_pick, unavailable
from lb.sched.dest import Dest
from lb.sched.siphash import hsiphash_u32

TAB_SIZE = 4093  # primes[CONFIG_IP_VS_MH_TAB_INDEX - 8] with the default index 12
TAB_BITS = 6  # CONFIG_IP_VS_MH_TAB_INDEX / 2
# generate_hash_secret(): fixed keys, so the table is the same on every machine.
HASH1 = (2654435761, 2654435761)
HASH2 = (2654446892, 2654446892)


def _hashkey(fold: int, port: int, key: tuple[int, int], offset: int) -> int:
    return hsiphash_u32((offset + port + fold) & 0xFFFFFFFF, *key)


class Maglev(Recomputing):
    """Slots are shared out in proportion to each destination's *last non-zero* weight,
    so a quiesced destination keeps its slots (and its clients go nowhere, or elsewhere
    with mh-fallback) until it is deleted."""

    name = "mh"
    MAX_DESTS = TAB_SIZE

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.lookup: list[Dest | None] = [None] * TAB_SIZE
        self.changed()

    def changed(self) -> None:
        """ip_vs_mh_dest_changed(): gcd and shift of the last weights, then the table."""
        dests = self.target.dests
        if len(dests) > TAB_SIZE:  # the kernel refuses (-EINVAL) and keeps the old table
            return
        g = gcd(*(d.last_weight for d in dests if d.last_weight > 0))
        if g < 1:
            self.lookup = [None] * TAB_SIZE
            return
        mw = max(d.last_weight for d in dests) // g
        rshift = max(mw.bit_length() - TAB_BITS, 0)
        # ip_vs_mh_permutate()
        perm: list[int] = []
        skip: list[int] = []
        turns: list[int] = []
        for d in dests:
            offset = _hashkey(d.fold, d.port, HASH1, 0) % TAB_SIZE
            skip.append(_hashkey(d.fold, d.port, HASH2, 0) % (TAB_SIZE - 1) + 1)
            perm.append(offset)
            lw = d.last_weight
            turns.append(((lw // g) >> rshift) or int(lw != 0))
        # ip_vs_mh_populate()
        lookup: list[Dest | None] = [None] * TAB_SIZE
        taken = bytearray(TAB_SIZE)
        n = dt_count = 0
        while n < TAB_SIZE:
            i = 0
            while i < len(dests):
                if turns[i] < 1:
                    i += 1
                    continue
                c = perm[i]
                while taken[c]:
                    c += skip[i]
                    if c >= TAB_SIZE:
                        c -= TAB_SIZE
                perm[i] = c
                taken[c] = 1
                lookup[c] = dests[i]
                n += 1
                if n == TAB_SIZE:
                    break
                dt_count += 1
                if dt_count >= turns[i]:
                    dt_count = 0
                    i += 1
            else:
                continue
            break
        self.lookup = lookup

    def slot(self, req: Request, offset: int = 0) -> int:
        port = req.src_port if SchedFlag.PORT in self.target.flags else 0
        return _hashkey(req.src_fold, port, HASH1, offset) % TAB_SIZE

    def schedule(self, req: Request) -> Dest | None:
        ihash = self.slot(req)

        def probes() -> Iterator[Dest | None]:
            # ip_vs_mh_get_fallback() probes slot hash(offset=(k + ihash) mod size) for
            # k = 0..size-1. With no destination available at all it cannot succeed: say
            # so at once instead of computing 4093 hashes.
            if all(unavailable(x, req) for x in self.target.dests):
                return
            for k in range(TAB_SIZE):
                yield self.lookup[self.slot(req, (k + ihash) % TAB_SIZE)]

        return hashed_pick(self.lookup[ihash], req, SchedFlag.FALLBACK in self.target.flags, probes)
