"""Prometheus metrics, read from the dataplanes' own counters at scrape time.

Nothing on the data path touches prometheus-client: relays bump plain integers
(lb.stats.Counters) and a custom collector turns `observe()` snapshots into metric
families when Prometheus scrapes. Rare events (reloads, applies) use client objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from lb import __version__
from lb.health.monitor import Monitor
from lb.model import BackendState, Endpoint, Protocol, ServiceKey
from lb.stats import BackendSnapshot, ErrorReason, ServiceSnapshot

SYNC_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def backend_state_label(b: BackendSnapshot) -> BackendState:
    """A backend removed from the config but still draining shows as DRAIN."""
    return b.backend.state if b.backend is not None else BackendState.DRAIN


class _SnapshotCollector(Collector):
    def __init__(
        self,
        snapshots: Callable[[], list[ServiceSnapshot]],
        monitors: Callable[[], Mapping[tuple[ServiceKey, Endpoint], Monitor]],
    ) -> None:
        self.snapshots = snapshots
        self.monitors = monitors

    def collect(self) -> Iterator[Metric]:
        svc = ["service", "dataplane"]
        be = ["service", "backend", "dataplane"]
        c, g = CounterMetricFamily, GaugeMetricFamily
        Family = type[CounterMetricFamily | GaugeMetricFamily]
        specs: list[tuple[str, Family, str, list[str], str]] = [
            ("s_conns", c, "lb_service_connections", svc,
             "Client connections (TCP) or flows (UDP) given a backend."),
            ("s_active", g, "lb_service_connections_active", svc, "Open client connections (TCP)."),
            ("s_flows", g, "lb_udp_flows_active", svc, "Live UDP flows."),
            ("s_err", c, "lb_service_connection_errors", [*svc, "reason"],
             "Clients refused or dropped, by reason."),
            ("s_in", c, "lb_service_in_bytes", svc, "Bytes from clients towards backends."),
            ("s_out", c, "lb_service_out_bytes", svc, "Bytes from backends back to clients."),
            ("s_inp", c, "lb_service_in_packets", svc, "Datagrams from clients (UDP)."),
            ("s_outp", c, "lb_service_out_packets", svc, "Datagrams back to clients (UDP)."),
            ("s_tpl", g, "lb_persistence_templates", svc, "Live persistence templates."),
            ("b_conns", c, "lb_backend_connections", be,
             "Connections or flows scheduled to the backend."),
            ("b_active", g, "lb_backend_connections_active", be,
             "Active connections (IPVS ActiveConn)."),
            ("b_inactive", g, "lb_backend_connections_inactive", be,
             "Inactive connections: closed ones in TIME_WAIT, and UDP flows (IPVS InActConn)."),
            ("b_err", c, "lb_backend_connection_errors", [*be, "reason"],
             "Failed connection attempts to the backend, by reason."),
            ("b_in", c, "lb_backend_in_bytes", be, "Bytes sent to the backend."),
            ("b_out", c, "lb_backend_out_bytes", be, "Bytes received from the backend."),
            ("b_inp", c, "lb_backend_in_packets", be, "Datagrams sent to the backend (UDP)."),
            ("b_outp", c, "lb_backend_out_packets", be, "Datagrams from the backend (UDP)."),
            ("b_up", g, "lb_backend_up", [*be, "state"],
             "1 for the backend's current state, one series per state."),
            ("b_weight", g, "lb_backend_weight", be, "Configured weight, with runtime edits."),
            ("b_eweight", g, "lb_backend_effective_weight", be,
             "Weight given to the scheduler (0 unless UP)."),
            ("b_over", g, "lb_backend_overloaded", be,
             "1 while the backend is at its connection threshold."),
        ]  # fmt: skip
        f = {key: kind(name, doc, labels=labels) for key, kind, name, labels, doc in specs}
        for s in self.snapshots():
            name, dp = s.service.name, s.dataplane
            t = s.totals
            f["s_conns"].add_metric([name, dp], t.conns)
            udp = s.service.protocol is Protocol.UDP
            f["s_flows" if udp else "s_active"].add_metric([name, dp], s.open)
            for reason in ErrorReason:
                f["s_err"].add_metric([name, dp, reason.value], t.errors[reason])
            f["s_in"].add_metric([name, dp], t.bytes_in)
            f["s_out"].add_metric([name, dp], t.bytes_out)
            if udp:
                f["s_inp"].add_metric([name, dp], t.packets_in)
                f["s_outp"].add_metric([name, dp], t.packets_out)
            f["s_tpl"].add_metric([name, dp], sum(b.persistent for b in s.backends))
            for b in s.backends:
                lbl = [name, str(b.address), dp]
                bt = b.totals
                f["b_conns"].add_metric(lbl, bt.conns)
                f["b_active"].add_metric(lbl, b.active)
                f["b_inactive"].add_metric(lbl, b.inactive)
                for reason in ErrorReason:
                    if reason is not ErrorReason.NO_BACKEND:
                        f["b_err"].add_metric([*lbl, reason.value], bt.errors[reason])
                f["b_in"].add_metric(lbl, bt.bytes_in)
                f["b_out"].add_metric(lbl, bt.bytes_out)
                if udp:
                    f["b_inp"].add_metric(lbl, bt.packets_in)
                    f["b_outp"].add_metric(lbl, bt.packets_out)
                current = backend_state_label(b)
                for state in BackendState:
                    f["b_up"].add_metric([*lbl, state.value], 1 if state is current else 0)
                f["b_weight"].add_metric(lbl, b.backend.weight if b.backend else 0)
                f["b_eweight"].add_metric(lbl, b.weight)
                f["b_over"].add_metric(lbl, 1 if b.overloaded else 0)
        yield from f.values()
        yield from self._health()

    def _health(self) -> Iterator[Metric]:
        lbl = ["service", "backend"]
        checks = CounterMetricFamily("lb_health_checks", "Health checks run.", labels=lbl)
        fails = CounterMetricFamily("lb_health_check_failures", "Health checks failed.", labels=lbl)
        moves = CounterMetricFamily(
            "lb_health_check_transitions", "UP/DOWN transitions from checks.", labels=[*lbl, "to"]
        )
        for (_, address), m in self.monitors().items():
            k = [m.service, str(address)]
            checks.add_metric(k, m.checks)
            fails.add_metric(k, m.failures)
            moves.add_metric([*k, "up"], m.went_up)
            moves.add_metric([*k, "down"], m.went_down)
        yield from (checks, fails, moves)


class Metrics:
    """The registry /metrics serves, and the few metrics recorded as events happen."""

    def __init__(
        self,
        snapshots: Callable[[], list[ServiceSnapshot]],
        monitors: Callable[[], Mapping[tuple[ServiceKey, Endpoint], Monitor]],
    ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        Info("lb_build", "The running lb.", registry=self.registry).info({"version": __version__})
        self.reloads = Counter(
            "lb_config_reloads", "Config reloads, by result.", ["result"], registry=self.registry
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self.sync_seconds = Histogram(
            "lb_sync_duration_seconds",
            "Time to apply the desired state to a dataplane.",
            ["dataplane"],
            buckets=SYNC_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(snapshots, monitors))

    def record_sync(self, dataplane: str, seconds: float) -> None:
        self.sync_seconds.labels(dataplane).observe(seconds)
