"""lb.stats.STATS is the one table of counters: every Totals and Rates field has its entry,
and the admin API's view and `lb list` columns are drawn from it."""

from __future__ import annotations

import dataclasses

from lb.admin.listing import RATE_COLUMNS, STATS_COLUMNS
from lb.model import Protocol
from lb.rates import Rates
from lb.stats import RATED, STATS, ErrorReason, Totals, totals_json


def test_every_counter_and_rate_has_one_entry() -> None:
    counters = [f.name for f in dataclasses.fields(Totals) if f.name != "errors"]
    assert sorted(s.attr for s in STATS) == sorted(counters)
    assert sorted(str(s.rate) for s in RATED) == sorted(f.name for f in dataclasses.fields(Rates))
    names = [n for s in STATS for n in (s.service_metric, s.backend_metric)]
    assert len(set(names)) == len(names)


def test_the_columns_are_ipvsadms() -> None:
    assert STATS_COLUMNS == "   Conns   InPkts  OutPkts  InBytes OutBytes"
    assert RATE_COLUMNS == "     CPS    InPPS   OutPPS    InBPS   OutBPS"


def test_the_admin_view_of_totals() -> None:
    t = Totals(
        conns=3,
        bytes_in=10,
        bytes_out=20,
        packets_in=1,
        packets_out=2,
        errors=dict.fromkeys(ErrorReason, 0) | {ErrorReason.REFUSED: 4},
        resets=2,
    )
    udp = totals_json(t, Protocol.UDP)
    assert udp["total"] == 3 and udp["bytes"] == {"in": 10, "out": 20}
    assert udp["packets"] == {"in": 1, "out": 2}
    assert udp["errors"] == {r.value: (4 if r is ErrorReason.REFUSED else 0) for r in ErrorReason}
    assert udp["resets"] is None  # TCP only
    tcp = totals_json(t, Protocol.TCP)
    assert tcp["packets"] is None and tcp["resets"] == 2
