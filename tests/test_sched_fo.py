"""fo against ip_vs_fo.c: the highest weight not overloaded, a tie to the first in the list."""

from __future__ import annotations

import pytest

from lb.config import ConfigError, parse_config
from lb.model import SchedulerName
from lb.sched import SCHEDULERS
from lb.virtual_service import TIME_WAIT
from offload.ipvs import save_lines
from offload.nft_rules import cycle, not_expressible_nft
from offload.policy import kernel_service, not_expressible_ipvs
from tests.support.vs import Harness, name_of


def test_the_highest_weight_takes_every_connection() -> None:
    h = Harness("fo").add("A", 1).add("B", 3).add("C", 2)
    assert h.order() == "CBA"
    assert h.picks(4) == "BBBB"


def test_a_tie_goes_to_the_first_in_the_list_the_most_recently_added() -> None:
    h = Harness("fo").add("A", 2).add("B", 2).add("C", 1)
    assert h.order() == "CBA"
    assert h.picks(3) == "BBB"  # B is ahead of A in the list (added after it)
    h.add("D", 2)  # a new destination goes to the head: it wins the tie now
    assert h.picks(2) == "DD"


def test_weight_zero_never_wins() -> None:
    h = Harness("fo").add("A", 0).add("B", 0)
    assert h.pick() == "-"
    h.add("C", 1)
    assert h.picks(2) == "CC"
    assert Harness("fo").pick() == "-"


def test_an_overloaded_destination_fails_over_to_the_next_weight() -> None:
    h = Harness("fo").add("A", 1).add("B", 5, upper=2)
    first, second = h.open(), h.open()  # B at its upper threshold: overloaded
    assert first is not None and second is not None
    assert name_of(second.dest.endpoint) == "B" and second.dest.overloaded
    assert h.picks(2) == "AA"
    h.vs.release(first, h.now)
    h.vs.release(second, h.now)
    h.now += TIME_WAIT + 1  # their TIME_WAIT over: B is below 3/4 of its threshold again
    assert h.picks(2) == "BB"


def test_every_dest_overloaded_refuses() -> None:
    h = Harness("fo").add("A", 1, upper=1)
    assert h.open() is not None
    assert h.pick() == "-"


def test_edits_take_effect_at_the_next_pick() -> None:
    h = Harness("fo").add("A", 1).add("B", 3)
    assert h.pick() == "B"
    h.edit("A", 4)
    assert h.pick() == "A"
    h.edit("A", 0)  # drained: B again
    assert h.pick() == "B"
    h.delete("B")
    assert h.pick() == "-"  # A is at weight 0
    h.edit("A", 1)
    assert h.pick() == "A"


def test_a_connect_retry_excludes_the_failed_destination() -> None:
    h = Harness("fo").add("A", 1).add("B", 3)
    b = h.vs.dests[0]
    conn = h.vs.connect(bytes(4), 1, 0.0, exclude={b})
    assert conn is not None and name_of(conn.dest.endpoint) == "A"


def config(extra: str = "") -> str:
    return (
        "services:\n"
        "  - {name: web, listen: '10.0.0.1:80', scheduler: fo, retries: 0, backends: ["
        "{address: '192.168.1.1:8080', weight: 2}, {address: '192.168.1.2:8080', weight: 5},"
        f" {{address: '192.168.1.3:8080', weight: 5}}]{extra}}}\n"
    )


def test_the_config_takes_fo_and_no_flags() -> None:
    (s,) = parse_config(config()).services
    assert s.scheduler is SchedulerName.FO
    with pytest.raises(ConfigError) as e:
        parse_config(config(", scheduler_flags: [fo-port]"))
    assert "the fo scheduler takes no flags (only sh and mh do)" in str(e.value)


def test_ipvs_carries_fo_as_is() -> None:
    (s,) = parse_config(config()).services
    assert SCHEDULERS[SchedulerName.FO].ipvs and not_expressible_ipvs(s) is None
    assert kernel_service(s).scheduler == "fo"
    assert save_lines(s)[0] == "-A -t 10.0.0.1:80 -s fo"


def test_nftables_carries_fo_as_its_one_backend_in_every_slot() -> None:
    (s,) = parse_config(config()).services
    assert not_expressible_nft(s) is None
    # the tie of weight 5 goes to the last in the file: first in the kernel's list
    assert [str(e) for e in cycle(s)] == ["192.168.1.3:8080"] * 3
    (thresholds,) = parse_config(
        config().replace("weight: 2}", "weight: 2, max_connections: 10}")
    ).services
    assert "connection thresholds need IPVS or userspace" in (not_expressible_nft(thresholds) or "")
