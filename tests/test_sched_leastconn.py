"""lc, wlc, sed, nq: the kernel's formulas and tie-breaking over live counts."""

from __future__ import annotations

import random

import pytest

from lb.sched import Dest
from lb.virtual_service import Conn
from tests.support.vs import Harness, name_of


def test_lc_counts_active_as_256_inactive() -> None:
    h = Harness("lc").add("A").add("B").add("C")
    assert h.order() == "CBA"
    c = h.open()  # ties go to the first in list order
    assert c is not None and name_of(c.dest.endpoint) == "C"
    # B: 255 inactive (< one active on C): B is less loaded than C.
    b = h.vs.find(h.vs.dests[1].endpoint)
    assert b is not None
    b.inactive = 255
    a = h.vs.dests[2]
    a.active = 1
    assert h.pick() == "B"
    b.inactive = 256  # now a tie with C (1 active = 256): C comes first
    assert h.pick() == "C"


def test_lc_ignores_weight_except_zero() -> None:
    h = Harness("lc").add("A", 100).add("B", 1).add("C", 0)
    assert h.pick() == "B"  # list C B A: C is quiesced, B first among equals


def test_wlc_cross_multiplies_and_keeps_the_first_on_ties() -> None:
    h = Harness("wlc").add("A", 3).add("B", 2).add("C", 1)
    held = [h.open() for _ in range(6)]
    # overheads (x256 active): C 0 -> C; then C 256/1 vs B 0/2 -> B; then ...
    assert "".join(name_of(c.dest.endpoint) for c in held if c) == "CBAABA"


def test_sed_counts_the_new_connection_and_ignores_inactive() -> None:
    h = Harness("sed").add("A", 1).add("B", 3)
    # list B(3) A(1); cost (active + 1) / w. B: 1/3, 2/3, then 3/3 ties A's 1/1 and the
    # earlier in the list keeps it (strict >); at 4/3 A wins.
    picks = [h.open() for _ in range(4)]
    assert "".join(name_of(c.dest.endpoint) for c in picks if c) == "BBBA"
    dest = h.vs.dests[1]
    dest.inactive = 1000  # inactive connections do not count for sed
    assert h.open() is not None


def test_nq_takes_the_first_idle_backend() -> None:
    h = Harness("nq").add("A", 1).add("B", 5).add("C", 1)
    first = [h.open() for _ in range(3)]  # every backend idle in turn: list order C B A
    assert "".join(name_of(c.dest.endpoint) for c in first if c) == "CBA"
    # None idle now: like sed, (active + 1) / w: B 2/5 beats 2/1
    assert h.pick() == "B"


def _oracle(dests: list[Dest], kind: str) -> Dest | None:
    """The kernel rules written plainly: fractions, first in list order on ties."""
    avail = [d for d in dests if not d.overloaded and d.weight > 0]
    if not avail:
        return None
    if kind == "lc":
        return min(avail, key=lambda d: d.overhead())
    if kind == "nq":
        for d in avail:
            if d.active == 0:
                return d

    def cost(d: Dest) -> int:
        return d.overhead() if kind == "wlc" else d.active + 1

    return min(avail, key=lambda d: cost(d) / d.weight)


@pytest.mark.parametrize("kind", ["lc", "wlc", "sed", "nq"])
def test_random_histories_match_the_plain_formula(kind: str) -> None:
    rng = random.Random(kind)
    for _ in range(30):
        h = Harness(kind)
        for name in "ABCDEF"[: rng.randint(1, 6)]:
            h.add(name, rng.choice([0, 1, 1, 2, 3, 5, 8]))
        conns: list[Conn] = []
        for _ in range(200):
            r = rng.random()
            if r < 0.55:
                h.vs.expire(h.now)  # connect() runs due timers first; so does the oracle
                expected = _oracle(h.vs.dests, kind)
                c = h.open()
                assert (c.dest if c else None) is expected
                if c:
                    conns.append(c)
            elif conns and r < 0.85:
                c = conns.pop(rng.randrange(len(conns)))
                h.vs.close(c, h.now)  # lingers as inactive for TIME_WAIT
            else:
                h.now += rng.choice([1.0, 30.0, 200.0])
