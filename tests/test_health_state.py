"""The pure health state machine (HAProxy's rise/fall counter) and the displayed state."""

from __future__ import annotations

from lb.health.state import CheckState
from lb.model import AdminState, BackendState, backend_state


def run(state: CheckState, results: str) -> str:
    out = ""
    for r in results:
        state = state.observe(r == "+")
        out += "U" if state.up else "D"
    return out


def test_starts_up_but_one_failure_away_from_down() -> None:
    assert CheckState.initial(2, 3).up
    assert run(CheckState.initial(2, 3), "-") == "D"


def test_confirmed_backend_needs_fall_failures() -> None:
    # rise 2, fall 3: health 2 at start, top 4; two passes confirm it
    assert run(CheckState.initial(2, 3), "++---") == "UUUUD"


def test_down_backend_needs_rise_passes() -> None:
    assert run(CheckState.initial(2, 3), "-++") == "DDU"
    assert run(CheckState.initial(3, 1), "-+-+++") == "DDDDDU"


def test_flapping_does_not_bring_it_down_when_confirmed() -> None:
    assert run(CheckState.initial(2, 3), "++-+-+-") == "UUUUUUU"


def test_retune_keeps_up_or_down() -> None:
    up = CheckState.initial(2, 3).passed().passed()
    assert up.retune(5, 5).up
    down = CheckState.initial(2, 3).failed()
    assert not down.retune(1, 1).up


def test_displayed_state_combines_admin_and_health() -> None:
    assert backend_state(AdminState.READY, True) is BackendState.UP
    assert backend_state(AdminState.READY, False) is BackendState.DOWN
    assert backend_state(AdminState.DRAIN, True) is BackendState.DRAIN
    assert backend_state(AdminState.DRAIN, False) is BackendState.DOWN
    assert backend_state(AdminState.MAINT, False) is BackendState.MAINT
