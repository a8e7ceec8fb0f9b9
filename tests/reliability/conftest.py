"""The reliability tier: lb under faults and at its limits, each scenario asserting a
figure (docs/reliability.md). Its tests, and the fuzzing's (tests/fuzz/), are marked
`reliability`: `-m reliability` runs the tier, `-m "not reliability"` everything else."""

from __future__ import annotations

import pytest

from tests.reliability.tier import mark, report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark(items)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    report(terminalreporter)
