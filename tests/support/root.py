"""Tests that need root: skipped on a laptop without it, failed on CI."""

from __future__ import annotations

import os

import pytest

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_root() -> None:
    """Skip on a laptop without root; on CI a missing privilege is a failure, not a skip."""
    if os.geteuid() != 0:
        if CI:
            pytest.fail("this test needs root, and CI=true forbids skipping it")
        pytest.skip("needs root (network namespaces)")
