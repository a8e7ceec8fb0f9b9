"""Shared fixtures. Every async test runs on uvloop (the loop `lb run` uses)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import pytest
import uvloop

from tests.traffic import backends  # noqa: F401  (the fixture: backends in a namespace)

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The real-kernel tier runs inside a virtme-ng guest (tests/test_kernel_tier.py boots it),
# never directly on the host.
collect_ignore = [] if os.environ.get("LB_KERNEL_TIER") == "1" else ["kernel"]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], object]]:
    return {"uvloop": uvloop.new_event_loop}


def require_root() -> None:
    """Skip on a laptop without root; on CI a missing privilege is a failure, not a skip."""
    if os.geteuid() != 0:
        if CI:
            pytest.fail("this test needs root, and CI=true forbids skipping it")
        pytest.skip("needs root (network namespaces)")
