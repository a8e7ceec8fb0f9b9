"""The one order of edits every dataplane derives from a desired service."""

from __future__ import annotations

from lb.model import AdminState, Backend
from lb.plan import AddDest, DelDest, EditDest, plan_dests
from lb.virtual_service import DestView
from tests.support.vs import ep


def view(name: str, weight: int = 1, conns: int = 0) -> DestView:
    return DestView(ep(name), weight, 0, 0, conns)


def test_new_backends_are_added_in_file_order() -> None:
    ops = plan_dests([], [Backend(ep("A"), 3), Backend(ep("B"), 1)])
    assert ops == [AddDest(ep("A"), 3, 0, 0), AddDest(ep("B"), 1, 0, 0)]


def test_unchanged_is_no_op() -> None:
    assert plan_dests([view("B"), view("A", 3)], [Backend(ep("A"), 3), Backend(ep("B"), 1)]) == []


def test_removed_without_connections_is_deleted_with_connections_quiesced() -> None:
    current = [view("C", 1, conns=0), view("B", 2, conns=5), view("A")]
    assert plan_dests(current, [Backend(ep("A"))]) == [DelDest(ep("C")), EditDest(ep("B"), 0, 0, 0)]
    # once quiesced it waits; once drained it is deleted
    assert plan_dests([view("B", 0, conns=5), view("A")], [Backend(ep("A"))]) == []
    assert plan_dests([view("B", 0, conns=0), view("A")], [Backend(ep("A"))]) == [DelDest(ep("B"))]


def test_removals_come_before_additions() -> None:
    ops = plan_dests([view("A")], [Backend(ep("B"))])
    assert ops == [DelDest(ep("A")), AddDest(ep("B"), 1, 0, 0)]


def test_backend_not_up_is_programmed_with_weight_zero() -> None:
    desired = [
        Backend(ep("A"), 5, healthy=False),
        Backend(ep("B"), 5, AdminState.DRAIN),
        Backend(ep("C"), 5, AdminState.MAINT),
        Backend(ep("D"), 5, max_connections=10, resume_below=5),
    ]
    ops = plan_dests([view("A", 5), view("B", 5)], desired)
    assert ops == [
        EditDest(ep("A"), 0, 0, 0),
        EditDest(ep("B"), 0, 0, 0),
        AddDest(ep("C"), 0, 0, 0),
        AddDest(ep("D"), 5, 10, 5),
    ]


def test_a_draining_backend_put_back_is_edited_not_added() -> None:
    assert plan_dests([view("A", 0, conns=3)], [Backend(ep("A"), 2)]) == [
        EditDest(ep("A"), 2, 0, 0)
    ]
