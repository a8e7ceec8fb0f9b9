"""Connection accounting and overload thresholds, as ip_vs_bind_dest/unbind_dest keep them."""

from __future__ import annotations

import pytest

from lb.model import Protocol
from lb.virtual_service import CLOSE, TIME_WAIT
from tests.support.vs import Harness, ep


def test_tcp_connection_is_active_then_inactive_for_time_wait() -> None:
    h = Harness("rr").add("A")
    conn = h.open()
    assert conn is not None
    d = conn.dest
    assert (d.active, d.inactive) == (1, 0)
    h.vs.close(conn, 5.0)
    assert (d.active, d.inactive) == (0, 1)
    h.vs.expire(5.0 + TIME_WAIT - 0.01)
    assert d.inactive == 1
    h.vs.expire(5.0 + TIME_WAIT)
    assert d.inactive == 0


def test_reset_connection_lingers_for_close_timeout() -> None:
    h = Harness("rr").add("A")
    conn = h.open()
    assert conn is not None
    h.vs.close(conn, 0.0, reset=True)
    h.vs.expire(CLOSE)
    assert conn.dest.inactive == 0


def test_failed_connect_is_not_counted_at_all() -> None:
    h = Harness("rr").add("A")
    conn = h.open()
    assert conn is not None
    h.vs.release(conn, 0.0)
    assert (conn.dest.active, conn.dest.inactive) == (0, 0)


def test_udp_flows_are_inactive() -> None:
    h = Harness("rr", protocol=Protocol.UDP).add("A")
    conn = h.open()
    assert conn is not None
    assert (conn.dest.active, conn.dest.inactive) == (0, 1)


def test_upper_threshold_and_the_three_quarters_rule() -> None:
    h = Harness("rr").add("A", upper=4)
    conns = [c for c in (h.open() for _ in range(4)) if c is not None]
    d = h.vs.dests[0]
    assert len(conns) == 4 and d.overloaded and h.open() is None
    h.vs.release(conns.pop(), 0.0)  # total 3: 3 * 4 < 4 * 3 is false, still overloaded
    assert d.overloaded
    h.vs.release(conns.pop(), 0.0)  # total 2: below 3/4 of 4
    assert not d.overloaded


def test_lower_threshold() -> None:
    h = Harness("rr").add("A", upper=3, lower=1)
    conns = [h.open() for _ in range(3)]
    d = h.vs.dests[0]
    assert d.overloaded
    for c in conns[:2]:
        assert c is not None
        h.vs.release(c, 0.0)
        assert d.overloaded  # total 2, then 1: not below 1
    assert conns[2] is not None
    h.vs.release(conns[2], 0.0)
    assert not d.overloaded


def test_closing_counts_towards_the_threshold_until_time_wait_ends() -> None:
    h = Harness("rr").add("A", upper=2)
    a, b = h.open(), h.open()
    assert a is not None and b is not None
    h.vs.close(a, 0.0)
    h.vs.close(b, 0.0)  # both inactive: total still 2, still overloaded
    assert h.vs.dests[0].overloaded
    h.now = TIME_WAIT
    assert h.pick() == "A"


def test_raising_the_upper_threshold_clears_overload() -> None:
    h = Harness("rr").add("A", upper=1)
    assert h.open() is not None and h.vs.dests[0].overloaded
    h.edit("A", 1, upper=1)
    assert h.vs.dests[0].overloaded  # not raised: stays
    h.edit("A", 1, upper=5)
    assert not h.vs.dests[0].overloaded


def test_deleted_dest_keeps_counts_when_added_back() -> None:
    h = Harness("rr").add("A").add("B")
    conn = h.open()  # B
    assert conn is not None
    h.delete("B")
    h.add("B")
    assert h.vs.find(ep("B")) is conn.dest and conn.dest.active == 1


def test_adding_twice_is_an_error() -> None:
    h = Harness("rr").add("A")
    with pytest.raises(ValueError, match="already exists"):
        h.add("A")
