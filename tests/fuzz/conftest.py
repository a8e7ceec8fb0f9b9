"""Coverage-guided fuzzing, bounded: part of the reliability tier (tests/reliability/tier.py
marks its tests `reliability` and reports its figures with the tier's)."""

from __future__ import annotations

import pytest

from tests.reliability.tier import mark, report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark(items)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    report(terminalreporter)
