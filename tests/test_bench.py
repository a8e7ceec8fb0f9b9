"""The bench runs (its --quick mode, as CI runs it): results.json, the Markdown table and
the plot come out with every dataplane and size. It asserts nothing about speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.netns


def test_quick_bench_writes_results_table_and_plot(tmp_path: Path) -> None:
    require_root()
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--runs", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "results.json").read_text())
    control = doc["control"]
    assert set(control) == {
        "lb nftables",
        "lb nftables, changes via nft -f",
        "iptables-restore (legacy)",
        "iptables-restore (nft)",
    }
    for name, per in control.items():
        assert set(per) == {"1", "10", "100"}
        for steps in per.values():
            kernel = {"add_one_kernel", "edit_one_kernel"} if name == "lb nftables" else set()
            assert set(steps) == {"full", "add_one", "edit_one"} | kernel
            if kernel:  # a part of the change it was measured in
                assert steps["add_one_kernel"]["low"] <= steps["add_one"]["high"]
            assert all(
                s["runs"] == 2 and 0 < s["low"] <= s["median"] <= s["high"] for s in steps.values()
            )
    table = (out / "results.md").read_text()
    assert "| lb nftables |" in table and "### add one service to N" in table
    assert "### add one service to N: the kernel transaction alone" in table
    assert (out / "control.png").read_bytes().startswith(b"\x89PNG")
    assert not [
        ns
        for ns in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True
        ).stdout.split()
        if ns.startswith("lbbench")
    ]


def test_bad_arguments_are_refused_with_a_reason() -> None:
    for args, reason in (
        (["--sizes", "1,x"], "--sizes must be integers"),
        (["--sizes", "0"], "at least 1"),
        (["--runs", "0"], "--runs must be at least 1"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "bench", *args], capture_output=True, text=True, check=False
        )
        assert done.returncode == 2 and reason in done.stderr, (args, done.stderr)
