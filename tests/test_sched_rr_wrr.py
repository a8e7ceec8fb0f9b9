"""rr and wrr against hand-computed sequences of ip_vs_rr.c / ip_vs_wrr.c."""

from __future__ import annotations

from tests.support.vs import Harness


def test_list_order_is_reverse_of_insertion() -> None:
    h = Harness("rr").add("A").add("B").add("C")
    assert h.order() == "CBA"


def test_rr_walks_the_list_from_the_head() -> None:
    h = Harness("rr").add("A").add("B").add("C")
    assert h.picks(7) == "CBACBAC"


def test_rr_add_does_not_move_the_cursor() -> None:
    h = Harness("rr").add("A").add("B").add("C")
    assert h.picks(2) == "CB"
    h.add("D")  # D goes to the head: reached after the wrap
    assert h.order() == "DCBA"
    assert h.picks(5) == "ADCBA"


def test_rr_deleting_the_cursor_moves_it_back_one() -> None:
    h = Harness("rr").add("A").add("B").add("C")
    assert h.picks(2) == "CB"  # cursor on B
    h.delete("B")  # cursor moves to C, its predecessor
    assert h.picks(3) == "ACA"


def test_rr_deleting_the_first_puts_the_cursor_at_the_head() -> None:
    h = Harness("rr").add("A").add("B").add("C")
    assert h.pick() == "C"
    h.delete("C")
    assert h.picks(3) == "BAB"


def test_rr_skips_quiesced_and_overloaded() -> None:
    h = Harness("rr").add("A").add("B", weight=0).add("C")
    assert h.picks(4) == "CACA"
    h.edit("B", 1, upper=1)
    assert h.pick() == "C"  # the cursor was on A: wrap to the head
    conn = h.open()  # B gets it, reaches its upper threshold and is overloaded
    assert conn is not None and conn.dest.overloaded
    assert h.picks(3) == "ACA"


def test_rr_with_nothing_available_refuses() -> None:
    h = Harness("rr").add("A", weight=0).add("B", weight=0)
    assert h.pick() == "-"
    assert Harness("rr").pick() == "-"


def test_wrr_history_matters_reference_example() -> None:
    # docs/semantics.md: a service created empty, then given C(2), B(3), A(4) one at a
    # time starts with cw = 1 (after C alone, di = 2, mw = 1), so its first picks are
    # A B C, then the steady cycle A | A B | A B C | A B C.
    h = Harness("wrr").add("C", 2).add("B", 3).add("A", 4)
    assert h.order() == "ABC"
    assert h.vs.sched.cw == 1  # type: ignore[attr-defined]
    assert h.picks(3) == "ABC"
    assert h.picks(9) == "AABABCABC"
    assert h.picks(9) == "AABABCABC"


def test_wrr_scheduler_bound_to_a_full_list_starts_at_max_weight() -> None:
    h = Harness("rr").add("C", 2).add("B", 3).add("A", 4)
    h.vs.edit_service(h.vs.scheduler_name.__class__("wrr"), frozenset(), None)
    assert h.picks(9) == "AABABCABC"


def test_wrr_with_a_common_divisor() -> None:
    # A(4) then B(2): after A alone di=4, mw=1, cw=1; after B, di=2, mw=3 and
    # cw = (1 // 2) * 2 + 1 = 1.
    h = Harness("wrr").add("A", 4).add("B", 2)
    assert h.order() == "BA"
    assert h.picks(2) == "BA"
    assert h.picks(6) == "ABAABA"


def test_wrr_edit_resets_cursor_and_keeps_cw() -> None:
    h = Harness("wrr").add("A", 1).add("B", 1).add("C", 1)
    assert h.picks(2) == "CB"
    h.edit("A", 1)  # any edit: cursor back to the head, cw stays 1
    assert h.picks(4) == "CBAC"


def test_wrr_quiesced_and_all_overloaded() -> None:
    h = Harness("wrr").add("A", 2).add("B", 0)
    assert h.picks(3) == "AAA"
    h = Harness("wrr").add("A", 1, upper=1).add("B", 1, upper=1)
    a, b = h.open(), h.open()
    assert a is not None and b is not None
    assert h.pick() == "-"  # every destination overloaded: the guard stops the scan
    h.vs.release(a, 0.0)
    assert h.pick() in "AB"


def test_wrr_no_positive_weight_refuses() -> None:
    h = Harness("wrr").add("A", 0)
    assert h.pick() == "-"
    h.edit("A", 3)
    assert h.picks(2) == "AA"
