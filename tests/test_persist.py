"""Persistence templates: the kernel's renew and expire rules (ip_vs_core.c, ip_vs_conn.c)."""

from __future__ import annotations

import ipaddress

from lb.model import Persistence, Protocol
from lb.persist import Affinity
from tests.support.vs import Harness, ep, name_of


def persistent(timeout: int = 300, prefix: int = 32, protocol: Protocol = Protocol.TCP) -> Harness:
    return (
        Harness("rr", persistence=Persistence(timeout, prefix), protocol=protocol)
        .add("A")
        .add("B")
        .add("C")
    )


def test_same_client_same_backend_others_spread() -> None:
    h = persistent()
    assert {h.pick("10.0.0.1") for _ in range(5)} == {"C"}
    assert h.pick("10.0.0.2") == "B"
    assert h.pick("10.0.0.3") == "A"
    assert h.pick("10.0.0.1") == "C"


def test_netmask_groups_clients_of_a_subnet() -> None:
    h = persistent(prefix=24)
    assert {h.pick(f"10.0.0.{i}") for i in range(1, 20)} == {"C"}
    assert h.pick("10.0.1.1") == "B"


def test_template_renews_on_each_new_connection_then_expires() -> None:
    h = persistent(timeout=300)
    assert h.pick("10.0.0.1") == "C"  # template until 300
    h.now = 299.0
    assert h.pick("10.0.0.1") == "C"  # renewed: until 599
    h.now = 598.0
    assert h.pick("10.0.0.1") == "C"  # until 898
    h.now = 898.0
    assert h.pick("10.0.0.1") == "B"  # expired: scheduled again (rr moves on)


def test_open_connections_keep_the_template_and_shorten_it_to_60s() -> None:
    h = persistent(timeout=300)
    conn = h.open("10.0.0.1")
    assert conn is not None and name_of(conn.dest.endpoint) == "C"
    # The timer fires at 300 with the connection open: kept, checked again every 60 s.
    h.now = 400.0
    h.vs.close(conn, h.now)  # closed at 400: its entry lingers in TIME_WAIT until 520
    h.now = 530.0  # fired at 360, 420, 480 (held), 540 is next
    again = h.open("10.0.0.1")
    assert again is not None and again.dest is conn.dest
    h.vs.release(again, h.now)  # renewed by the new connection, with the 60 s timeout now
    h.now = 589.0
    assert h.pick("10.0.0.1") == "C"  # until 649
    h.now = 649.0
    assert h.pick("10.0.0.1") == "B"


def test_template_without_connections_dies_at_its_timeout() -> None:
    h = persistent(timeout=300)
    conn = h.open("10.0.0.1")
    assert conn is not None
    h.now = 10.0
    h.vs.close(conn, h.now)  # TIME_WAIT until 130, template until 300
    h.now = 300.0
    assert h.pick("10.0.0.1") == "B"


def test_quiesced_or_deleted_destination_invalidates_the_template() -> None:
    h = persistent()
    assert h.pick("10.0.0.1") == "C"
    h.edit("C", 0)  # expire_quiescent_template=1
    assert h.pick("10.0.0.1") == "B"
    assert h.pick("10.0.0.1") == "B"  # the new template sticks
    h.edit("C", 1)
    assert h.pick("10.0.0.1") == "B"
    h.delete("B")
    assert h.pick("10.0.0.1") in "AC"


def test_template_wins_over_overload() -> None:
    h = Harness("rr", persistence=Persistence(300, 32)).add("A", 1, upper=1).add("B")
    first = h.open("10.0.0.1")  # B (head), then A gets 10.0.0.2 and is overloaded
    second = h.open("10.0.0.2")
    assert first is not None and second is not None
    assert name_of(second.dest.endpoint) == "A" and second.dest.overloaded
    again = h.open("10.0.0.2")  # the template still points at A: the kernel does not check
    assert again is not None and again.dest is second.dest


def test_exclusion_reschedules_and_replaces_the_template() -> None:
    h = persistent()
    first = h.open("10.0.0.1")
    assert first is not None
    h.vs.release(first, 0.0)
    retry = h.vs.connect(bytes([10, 0, 0, 1]), 1, 0.0, exclude=[first.dest])
    assert retry is not None and retry.dest is not first.dest
    h.vs.release(retry, 0.0)
    assert h.pick("10.0.0.1") == name_of(retry.dest.endpoint)


def test_ipv6_prefix() -> None:
    import ipaddress

    from lb.model import Endpoint

    vip = Endpoint(ipaddress.ip_address("2001:db8::100"), 80)
    h = Harness("rr", persistence=Persistence(300, 64), vip=vip).add("A").add("B")
    assert {h.pick(f"2001:db8:0:1::{i}") for i in range(1, 10)} == {"B"}
    assert h.pick("2001:db8:0:2::1") == "A"


# --- templates moving between dataplanes (Affinity) --------------------------------------


def test_affinity_moves_to_a_fresh_service_and_keeps_each_client_on_its_backend() -> None:
    """What a promote or a demote does: the next dataplane starts from the templates the
    last one held, so clients keep their backends although its scheduler starts over."""
    old = persistent(timeout=300, prefix=24)
    placed = {src: old.pick(src) for src in ("10.0.0.1", "10.0.1.1", "10.0.2.1")}
    assert len(set(placed.values())) == 3
    old.now = 100.0
    moved = old.vs.export_affinity(old.now)
    assert sorted((str(a.client), name_of(a.backend), a.remaining) for a in moved) == sorted(
        (src.rsplit(".", 1)[0] + ".0", placed[src], 200.0) for src in placed
    )
    new = persistent(timeout=300, prefix=24)
    new.now = 5000.0  # another clock: only the remaining time crosses
    assert new.vs.seed_affinity(moved, new.now) == 3
    for src, backend in placed.items():
        assert new.pick(src) == backend
        assert new.pick(src[:-1] + "7") == backend  # another client of the same /24


def test_seeded_templates_expire_after_the_time_they_had_left() -> None:
    seeded = Affinity(ipaddress.ip_address("10.0.0.1"), ep("A"), 50.0)
    h = persistent(timeout=300)  # a fresh rr would give this client C
    assert h.vs.seed_affinity([seeded], 0.0) == 1
    h.now = 49.0
    assert h.pick("10.0.0.1") == "A"  # and renewed: 300 s from now
    later = persistent(timeout=300)
    later.vs.seed_affinity([seeded], 0.0)
    later.now = 49.0
    assert len(later.vs.templates.live(later.now)) == 1
    later.now = 51.0
    assert later.vs.templates.live(later.now) == []
    assert later.pick("10.0.0.1") == "C"  # scheduled afresh


def test_what_cannot_be_seeded_is_left_out() -> None:
    old = persistent()
    old.pick("10.0.0.1")
    old.pick("10.0.0.2")
    moved = old.vs.export_affinity(0.0)
    new = Harness("rr", persistence=Persistence(300, 32)).add("A")  # B and C are gone
    kept = [a for a in moved if name_of(a.backend) == "A"]
    assert new.vs.seed_affinity(moved, 0.0) == len(kept)
    assert persistent().vs.seed_affinity([], 0.0) == 0
    plain = Harness("rr").add("A").add("B").add("C")  # no persistence: nothing to seed
    assert plain.vs.seed_affinity(moved, 0.0) == 0


def test_a_template_that_controls_connections_is_not_overwritten() -> None:
    h = persistent()
    conn = h.open("10.0.0.1")
    assert conn is not None
    mine = name_of(conn.dest.endpoint)
    other = next(d.endpoint for d in h.vs.dests if name_of(d.endpoint) != mine)
    stale = [Affinity(ipaddress.ip_address("10.0.0.1"), other, 100.0)]
    assert h.vs.seed_affinity(stale, 0.0) == 0  # its own, with an open connection, wins
    assert h.pick("10.0.0.1") == mine


def test_invalid_templates_are_not_exported() -> None:
    h = persistent()
    backend = h.pick("10.0.0.1")
    h.edit(backend, 0)  # quiesced: the template would be replaced at the next connection
    assert h.vs.export_affinity(0.0) == []
