"""The bench's `lb ipvs` peer works where it can run: what `python -m bench`'s vm part
runs in this guest, cut down to one quick round of two workloads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def bench(out: Path, *args: str) -> None:
    """`python -m bench ARGS --out OUT`, which must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def test_bench_measures_lb_on_ipvs(tmp_path: Path) -> None:
    out = tmp_path / "results"
    bench(out, "--quick", "--runs", "1", "--only", "dataplane", "--peers", "direct,lb ipvs",
          "--workloads", "requests,udp")  # fmt: skip
    dp = json.loads((out / "results.json").read_text())["dataplane"]
    assert dp["kinds"]["lb ipvs"] == "kernel"
    for workload in ("requests", "udp"):
        r = dp["results"]["lb ipvs"][workload]
        assert r["errors"] == [], (workload, r)
        assert r["figures"], workload
    assert dp["results"]["lb ipvs"]["requests"]["figures"]["requests_per_s"]["median"] > 0
    assert dp["results"]["lb ipvs"]["udp"]["figures"]["datagrams_per_s"]["median"] > 0
    assert dp["ratios"]["direct"]["lb ipvs"]["requests"]


def test_bench_measures_the_ipvs_control_plane(tmp_path: Path) -> None:
    """The vm part's ipvs-control: lb ipvs beside lb nftables, told which service changed."""
    out = tmp_path / "results"
    bench(out, "--runs", "1", "--only", "ipvs-control", "--sizes", "5,20")
    control = json.loads((out / "results.json").read_text())["ipvs_control"]
    assert set(control) == {"lb ipvs", "lb nftables"}
    for per in control.values():
        for n in ("5", "20"):
            assert {"full", "add_one", "edit_one"} <= set(per[n])
            assert all(s["median"] > 0 for s in per[n].values())
    table = (out / "results.md").read_text()
    assert "## Control plane with IPVS" in table and "relative to 5 services" in table
    left = subprocess.run(["ipvsadm", "-Ln"], capture_output=True, text=True, check=True)
    assert "10.100." not in left.stdout  # each size's services were removed after it
