"""The scheduler table (lb/sched/__init__.py): complete, and what it says holds."""

from __future__ import annotations

from lb.model import SchedFlag, SchedulerName
from lb.sched import SCHEDULERS, with_flags
from tests.support.vs import Harness


def test_every_scheduler_name_has_one_entry_under_its_own_name() -> None:
    assert list(SCHEDULERS) == list(SchedulerName)
    for name, spec in SCHEDULERS.items():
        assert spec.name is name
        assert getattr(spec.make, "name", name) == name  # the class says the same


def test_flags_are_spelled_as_ipvsadm_spells_them() -> None:
    assert with_flags() == [SchedulerName.SH, SchedulerName.MH]
    for name in with_flags():
        assert SCHEDULERS[name].flags == {f"{name}-{f}": f for f in SchedFlag}


def test_every_registered_scheduler_survives_every_edit() -> None:
    for name in SCHEDULERS:
        h = Harness(name).add("A", 2).add("B", 3)
        h.edit("B", 1).edit("A", 0).delete("A").add("C", 4).edit("C", 4)
        assert h.pick() in "BC", name


def test_only_the_hashing_schedulers_fold_the_client_address() -> None:
    hashing = {n for n, s in SCHEDULERS.items() if s.hashes_client}
    assert hashing == {SchedulerName.SH, SchedulerName.MH}
    assert {n for n, s in SCHEDULERS.items() if s.max_backends} == {SchedulerName.MH}
