"""The Prometheus exposition of Metrics fed with made-up snapshots: every family, its label
values and its numbers, with and without per-backend series, read back through
prometheus-client's own parser; and the page built in slices of the event loop
(tests/test_admin_server.py checks /metrics against real traffic)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lb import __version__
from lb import metrics as metrics_module
from lb.health.monitor import Monitor
from lb.metrics import Metrics
from lb.model import (
    AdminState,
    Backend,
    BackendState,
    CheckKind,
    Endpoint,
    HealthCheck,
    Protocol,
    Service,
    ServiceKey,
)
from lb.stats import BackendSnapshot, Counters, ErrorReason, ServiceSnapshot, Totals

Labels = frozenset[tuple[str, str]]

A, B, C = (Endpoint.parse(a) for a in ("10.0.1.1:8080", "10.0.1.2:8080", "10.0.1.3:5353"))
WEB = Service(
    "web",
    Protocol.TCP,
    Endpoint.parse("10.0.0.1:80"),
    backends=(Backend(A, weight=3), Backend(B, weight=2, admin=AdminState.DRAIN)),
)
DNS = Service("dns", Protocol.UDP, Endpoint.parse("10.0.0.1:53"), backends=(Backend(C),))


def totals(
    conns: int, bytes_in: int, bytes_out: int, packets: tuple[int, int] = (0, 0), **errors: int
) -> Totals:
    c = Counters()
    c.conns, c.bytes_in, c.bytes_out = conns, bytes_in, bytes_out
    c.packets_in, c.packets_out = packets
    for reason, n in errors.items():
        for _ in range(n):
            c.error(ErrorReason(reason))
    return c.totals()


def snapshots() -> list[ServiceSnapshot]:
    web_a = BackendSnapshot(
        address=A,
        backend=WEB.backends[0],
        weight=3,
        active=4,
        inactive=1,
        persistent=2,
        overloaded=True,
        totals=totals(10, 1000, 2000, refused=1),
    )
    web_b = BackendSnapshot(  # drained by the operator: weight 2 in the file, 0 to the scheduler
        address=B,
        backend=WEB.backends[1],
        weight=0,
        active=0,
        inactive=0,
        persistent=0,
        overloaded=False,
        totals=totals(0, 0, 0),
    )
    gone = BackendSnapshot(  # removed from the config, still draining its connections
        address=Endpoint.parse("10.0.1.9:8080"),
        backend=None,
        weight=0,
        active=1,
        inactive=0,
        persistent=1,
        overloaded=False,
        totals=totals(5, 10, 20, timeout=2),
    )
    dns_c = BackendSnapshot(
        address=C,
        backend=DNS.backends[0],
        weight=1,
        active=0,
        inactive=7,
        persistent=0,
        overloaded=False,
        totals=totals(7, 300, 400, packets=(30, 40)),
    )
    return [
        ServiceSnapshot(
            service=WEB,
            dataplane="userspace",
            listening=True,
            open=5,
            totals=totals(15, 1010, 2020, refused=1, timeout=2, no_backend=3),
            backends=(web_a, web_b, gone),
        ),
        ServiceSnapshot(
            service=DNS,
            dataplane="ipvs",
            listening=False,
            open=7,
            totals=totals(7, 300, 400, packets=(30, 40)),
            backends=(dns_c,),
        ),
    ]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def scrape(m: Metrics) -> tuple[set[str], dict[tuple[str, Labels], float]]:
    """The family names and every sample (name, labels) -> value of one scrape."""
    text = m.text().decode()
    families, samples = set(), {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return families, samples


def lbl(**labels: str) -> Labels:
    return frozenset(labels.items())


def observing(snaps: list[ServiceSnapshot]) -> Callable[[ServiceKey | None], list[ServiceSnapshot]]:
    """A dataplane's observe() over `snaps` (read at each call)."""
    return lambda only: [s for s in snaps if only is None or s.service.key == only]


def metrics(
    session: aiohttp.ClientSession, snaps: list[ServiceSnapshot], backends: bool = True
) -> Metrics:
    check = HealthCheck(CheckKind.TCP, interval=1.0, timeout=1.0, rise=2, fall=3)
    mon = Monitor("web", A, check, session, lambda up, reason: None)
    mon.checks, mon.failures, mon.went_up, mon.went_down = 9, 4, 2, 1
    monitors = {(WEB.key, A): mon}
    return Metrics(
        observing(snaps),
        lambda: dict.fromkeys(s.service.key for s in snaps),
        lambda: monitors,
        backends=backends,
    )


async def test_every_family_is_exposed(session: aiohttp.ClientSession) -> None:
    families, samples = scrape(metrics(session, snapshots()))
    assert {
        "lb_build_info",
        "lb_config_reloads",
        "lb_sync_duration_seconds",
        "lb_service_connections",
        "lb_service_connections_active",
        "lb_udp_flows_active",
        "lb_service_connection_errors",
        "lb_service_in_bytes",
        "lb_service_out_bytes",
        "lb_service_in_packets",
        "lb_service_out_packets",
        "lb_persistence_templates",
        "lb_backend_connections",
        "lb_backend_connections_active",
        "lb_backend_connections_inactive",
        "lb_backend_connection_errors",
        "lb_backend_in_bytes",
        "lb_backend_out_bytes",
        "lb_backend_in_packets",
        "lb_backend_out_packets",
        "lb_backend_up",
        "lb_backend_weight",
        "lb_backend_effective_weight",
        "lb_backend_overloaded",
        "lb_health_checks",
        "lb_health_check_failures",
        "lb_health_check_transitions",
        "process_cpu_seconds",
    } <= families
    assert samples[("lb_build_info", lbl(version=__version__))] == 1
    assert not [name for name, _ in samples if name.endswith("_created")]


async def test_service_series_carry_service_and_dataplane(
    session: aiohttp.ClientSession,
) -> None:
    _, samples = scrape(metrics(session, snapshots()))
    web, dns = lbl(service="web", dataplane="userspace"), lbl(service="dns", dataplane="ipvs")
    assert samples[("lb_service_connections_total", web)] == 15
    assert samples[("lb_service_connections_total", dns)] == 7
    assert samples[("lb_service_in_bytes_total", web)] == 1010
    assert samples[("lb_service_out_bytes_total", web)] == 2020
    # open connections for TCP, live flows for UDP: each in its own family only
    assert samples[("lb_service_connections_active", web)] == 5
    assert samples[("lb_udp_flows_active", dns)] == 7
    assert ("lb_udp_flows_active", web) not in samples
    assert ("lb_service_connections_active", dns) not in samples
    # packets for UDP only
    assert samples[("lb_service_in_packets_total", dns)] == 30
    assert samples[("lb_service_out_packets_total", dns)] == 40
    assert ("lb_service_in_packets_total", web) not in samples
    # templates: the sum over the backends, the draining one's included
    assert samples[("lb_persistence_templates", web)] == 3
    # one series per reason, zeros included
    errors = {
        dict(labels)["reason"]: v
        for (name, labels), v in samples.items()
        if name == "lb_service_connection_errors_total" and ("service", "web") in labels
    }
    assert errors == {r.value: 0.0 for r in ErrorReason} | {
        "refused": 1,
        "timeout": 2,
        "no_backend": 3,
    }


async def test_backend_series_carry_the_backend_address(session: aiohttp.ClientSession) -> None:
    _, samples = scrape(metrics(session, snapshots()))
    a = {"service": "web", "backend": "10.0.1.1:8080", "dataplane": "userspace"}
    b = {"service": "web", "backend": "10.0.1.2:8080", "dataplane": "userspace"}
    gone = {"service": "web", "backend": "10.0.1.9:8080", "dataplane": "userspace"}
    c = {"service": "dns", "backend": "10.0.1.3:5353", "dataplane": "ipvs"}
    assert samples[("lb_backend_connections_total", lbl(**a))] == 10
    assert samples[("lb_backend_connections_active", lbl(**a))] == 4
    assert samples[("lb_backend_connections_inactive", lbl(**a))] == 1
    assert samples[("lb_backend_in_bytes_total", lbl(**a))] == 1000
    assert samples[("lb_backend_out_bytes_total", lbl(**a))] == 2000
    assert samples[("lb_backend_overloaded", lbl(**a))] == 1
    assert samples[("lb_backend_overloaded", lbl(**gone))] == 0
    assert samples[("lb_backend_in_packets_total", lbl(**c))] == 30
    assert samples[("lb_backend_out_packets_total", lbl(**c))] == 40
    assert ("lb_backend_in_packets_total", lbl(**a)) not in samples
    # the configured weight, and the one the scheduler is given
    assert samples[("lb_backend_weight", lbl(**a))] == 3
    assert samples[("lb_backend_effective_weight", lbl(**a))] == 3
    assert samples[("lb_backend_weight", lbl(**b))] == 2
    assert samples[("lb_backend_effective_weight", lbl(**b))] == 0
    assert samples[("lb_backend_weight", lbl(**gone))] == 0
    assert samples[("lb_backend_effective_weight", lbl(**gone))] == 0
    # a backend's errors by reason: never "no usable backend", which is the service's
    reasons = {
        dict(labels)["reason"]: v
        for (name, labels), v in samples.items()
        if name == "lb_backend_connection_errors_total" and lbl(**a) <= labels
    }
    assert "no_backend" not in reasons
    assert {"refused", "connect_failed", "timeout", "limit"} <= reasons.keys()
    assert reasons["refused"] == 1 and reasons["timeout"] == 0
    assert samples[("lb_backend_connection_errors_total", lbl(**gone, reason="timeout"))] == 2


async def test_backend_up_is_one_series_per_state_with_one_set(
    session: aiohttp.ClientSession,
) -> None:
    _, samples = scrape(metrics(session, snapshots()))

    def states(**backend: str) -> dict[str, float]:
        return {
            dict(labels)["state"]: v
            for (name, labels), v in samples.items()
            if name == "lb_backend_up" and lbl(**backend) <= labels
        }

    assert states(service="web", backend="10.0.1.1:8080") == {
        s.value: float(s is BackendState.UP) for s in BackendState
    }
    assert states(service="web", backend="10.0.1.2:8080") == {
        s.value: float(s is BackendState.DRAIN) for s in BackendState
    }
    # removed from the config but still draining: DRAIN
    assert states(service="web", backend="10.0.1.9:8080") == {
        s.value: float(s is BackendState.DRAIN) for s in BackendState
    }


async def test_health_check_counters_come_from_the_monitors(
    session: aiohttp.ClientSession,
) -> None:
    _, samples = scrape(metrics(session, snapshots()))
    k = {"service": "web", "backend": "10.0.1.1:8080"}
    assert samples[("lb_health_checks_total", lbl(**k))] == 9
    assert samples[("lb_health_check_failures_total", lbl(**k))] == 4
    assert samples[("lb_health_check_transitions_total", lbl(**k, to="up"))] == 2
    assert samples[("lb_health_check_transitions_total", lbl(**k, to="down"))] == 1


async def test_snapshots_are_read_at_each_scrape(session: aiohttp.ClientSession) -> None:
    snaps = snapshots()
    m = metrics(session, snaps)
    _, before = scrape(m)
    web = lbl(service="web", dataplane="userspace")
    assert before[("lb_service_connections_total", web)] == 15
    snaps[0] = ServiceSnapshot(
        service=WEB,
        dataplane="ipvs",
        listening=False,
        open=0,
        totals=totals(99, 0, 0),
        backends=(),
    )
    _, after = scrape(m)
    assert after[("lb_service_connections_total", lbl(service="web", dataplane="ipvs"))] == 99
    assert ("lb_service_connections_total", web) not in after


async def test_reloads_and_sync_times_are_recorded_as_they_happen(
    session: aiohttp.ClientSession,
) -> None:
    m = metrics(session, [])
    _, samples = scrape(m)
    assert samples[("lb_config_reloads_total", lbl(result="success"))] == 0
    assert samples[("lb_config_reloads_total", lbl(result="failure"))] == 0
    assert ("lb_service_connections_total", lbl(service="web", dataplane="userspace")) not in (
        samples
    )
    m.reloads.labels("success").inc()
    m.record_sync("ipvs", 0.003)
    m.record_sync("ipvs", 0.2)
    _, samples = scrape(m)
    assert samples[("lb_config_reloads_total", lbl(result="success"))] == 1
    ipvs = lbl(dataplane="ipvs")
    assert samples[("lb_sync_duration_seconds_count", ipvs)] == 2
    assert samples[("lb_sync_duration_seconds_sum", ipvs)] == pytest.approx(0.203)
    assert samples[("lb_sync_duration_seconds_bucket", lbl(dataplane="ipvs", le="0.0025"))] == 0
    assert samples[("lb_sync_duration_seconds_bucket", lbl(dataplane="ipvs", le="0.005"))] == 1
    assert samples[("lb_sync_duration_seconds_bucket", lbl(dataplane="ipvs", le="0.25"))] == 2
    assert samples[("lb_sync_duration_seconds_bucket", lbl(dataplane="ipvs", le="+Inf"))] == 2


async def test_without_backend_metrics_only_service_series_are_exposed(
    session: aiohttp.ClientSession,
) -> None:
    families, samples = scrape(metrics(session, snapshots(), backends=False))
    assert not [f for f in families if f.startswith(("lb_backend_", "lb_health_check"))]
    assert not [labels for _, labels in samples if "backend" in dict(labels)]
    web = lbl(service="web", dataplane="userspace")
    assert samples[("lb_service_connections_total", web)] == 15
    assert samples[("lb_persistence_templates", web)] == 3  # still summed over backends
    assert samples[("lb_service_connection_errors_total", web | lbl(reason="timeout"))] == 2


async def test_backends_are_counted_by_state_for_each_service(
    session: aiohttp.ClientSession,
) -> None:
    for backends in (False, True):
        _, samples = scrape(metrics(session, snapshots(), backends=backends))
        count: dict[str, dict[str, float]] = {}
        for (name, labels), v in samples.items():
            if name == "lb_service_backends":
                count.setdefault(dict(labels)["service"], {})[dict(labels)["state"]] = v
        # web: A up, B drained by the operator, one removed and draining
        assert count["web"] == {"UP": 1, "DOWN": 0, "DRAIN": 2, "MAINT": 0}
        assert count["dns"] == {"UP": 1, "DOWN": 0, "DRAIN": 0, "MAINT": 0}


async def test_label_values_are_escaped(session: aiohttp.ClientSession) -> None:
    odd = 'a"b\\c\nd'
    svc = Service(odd, Protocol.TCP, Endpoint.parse("10.0.0.2:80"), backends=(Backend(A),))
    snap = ServiceSnapshot(svc, "userspace", True, 0, totals(1, 0, 0), ())
    _, samples = scrape(metrics(session, [snap]))
    assert samples[("lb_service_connections_total", lbl(service=odd, dataplane="userspace"))] == 1


async def test_the_page_lets_the_event_loop_run_while_it_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    web = snapshots()[0]
    many = [
        replace(web, service=replace(WEB, name=f"web{i}", listen=Endpoint(A.ip, 1 + i)))
        for i in range(1000)
    ]
    by_key = {s.service.key: [s] for s in many}
    m = Metrics(lambda only: by_key.get(only, []) if only else many, lambda: by_key, dict)
    m.backends = True
    turns = 0

    async def other_work() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(other_work())
    await asyncio.sleep(0)
    monkeypatch.setattr(metrics_module, "SLICE", 0.0)  # a pause at every place it may
    page = b"".join(await m.page())
    task.cancel()
    assert page.count(b"\nlb_backend_connections_total{") == 1000 * 3
    assert turns >= 1000  # the loop ran after each service at least
    # the same page as one built at once (past the registry's part: process times move)
    assert page.partition(b"# HELP lb_service_")[2] == m.text().partition(b"# HELP lb_service_")[2]
