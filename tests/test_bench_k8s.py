"""bench/k8s.py: the k8s part runs end to end at a tiny size (`--quick --only k8s`), and
its reading of lb's histograms and log. It asserts nothing about speed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.k8s import CHURN_RATES, DATAPLANES, PHASES, Histogram, histogram, read_log
from tests.support.root import require_root
from tests.test_bench import bench

METRICS = """\
# HELP lb_kubernetes_network_programming_duration_seconds From an EndpointSlice's ...
# TYPE lb_kubernetes_network_programming_duration_seconds histogram
lb_kubernetes_network_programming_duration_seconds_bucket{le="0.5"} 10.0
lb_kubernetes_network_programming_duration_seconds_bucket{le="1.0"} 90.0
lb_kubernetes_network_programming_duration_seconds_bucket{le="2.0"} 100.0
lb_kubernetes_network_programming_duration_seconds_bucket{le="+Inf"} 100.0
lb_kubernetes_network_programming_duration_seconds_count 100.0
lb_kubernetes_network_programming_duration_seconds_sum 80.0
lb_kubernetes_sync_duration_seconds_count 3.0
"""


def test_quantiles_interpolate_within_buckets_as_histogram_quantile() -> None:
    h = histogram(METRICS, "lb_kubernetes_network_programming_duration_seconds")
    assert (h.count, h.sum) == (100.0, 80.0)
    assert h.quantile(0.5) == pytest.approx((0.5 + 0.5 * 40 / 80, 0.5, 1.0))
    assert h.quantile(0.99) == pytest.approx((1.0 + 1.0 * 9 / 10, 1.0, 2.0))
    # what came since: the difference of the counts
    since = h.minus(Histogram(tuple((le, 0.0) for le, _ in h.buckets), 0.0, 0.0))
    assert since == h
    # beyond the last finite bound: that bound, as Prometheus answers
    late = Histogram(((1.0, 0.0), (float("inf"), 5.0)), 50.0, 5.0)
    assert late.quantile(0.99) == (1.0, 1.0, float("inf"))


def test_the_log_gives_the_phases_of_a_start_and_the_failed_syncs(tmp_path: Path) -> None:
    log = tmp_path / "lb.log"
    lines = [
        {"ts": "2026-12-07T10:00:01.000Z", "event": "lb.started", "msg": "up"},
        {"ts": "2026-12-07T10:00:02.500Z", "event": "k8s.synced", "msg": "listed"},
        {"ts": "2026-12-07T10:00:03.000Z", "event": "k8s.sync_failed", "msg": "no luck"},
        {"ts": "2026-12-07T10:00:04.000Z", "event": "k8s.first_sync", "msg": "done"},
    ]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    launched = 1796637600.0  # 2026-12-07T10:00:00Z
    phases, failed = read_log(log, launched)
    assert phases == pytest.approx({"up": 1.0, "listed": 2.5, "programmed": 4.0})
    assert failed == ["no luck"]


@pytest.mark.netns
@pytest.mark.timeout(960)  # about 20 s, but it waits for a bench already running (its lock)
def test_the_k8s_part_runs_end_to_end_at_a_tiny_size(tmp_path: Path) -> None:
    require_root()
    out = tmp_path / "results"
    args = ("--quick", "--only", "k8s", "--sizes", "5", "--runs", "1", "--out", str(out))
    done = bench(*args, timeout=900)
    assert done.returncode == 0, done.stderr
    k8s = json.loads((out / "results.json").read_text())["k8s"]
    double = k8s["double"]["5"]
    assert double["list_endpoint_slices_decoded"]["median"] > 0
    assert double["endpoint_slices_mb"]["median"] > 0
    assert set(k8s["lb"]) == set(DATAPLANES)
    for per in k8s["lb"].values():
        figures = per["5"]
        assert {"start", "rss_mb", "idle_cpu_percent", *PHASES} <= set(figures)
        assert figures["failed_syncs"]["median"] == 0
        assert figures["up"]["median"] <= figures["programmed"]["median"]
        assert figures["programmed"]["median"] <= figures["start"]["median"]
    assert k8s["churn"]["services"] == 5
    for rates in k8s["churn"]["rates"].values():
        assert set(rates) == {str(r) for r in CHURN_RATES}
        for c in rates.values():  # every update applied, and its latency observed
            assert c["applied"] == c["updates"] > 0 and "caught_up" in c
            assert 0 < c["p50"] <= c["p99"]
    table = (out / "results.md").read_text()
    assert "## The Kubernetes API server double alone" in table
    assert "## lb run --source kubernetes at N Services" in table
    assert "| lb nftables, 100/s |" in table
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert not [ns for ns in listed.stdout.split() if ns.startswith("lbbench-k8s")]
