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
from lb.exhaustion import EXHAUSTION
from lb.health.monitor import Monitor
from lb.model import BackendState, Endpoint, Protocol, ServiceKey
from lb.stats import STATS, BackendSnapshot, ErrorReason, ServiceSnapshot, shown, stat_value

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


#: Reasons that are never a backend's: counted for the service only.
_SERVICE_ONLY = (ErrorReason.NO_BACKEND, ErrorReason.EXHAUSTED)


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
            ("s_active", g, "lb_service_connections_active", svc, "Open client connections (TCP)."),
            ("s_flows", g, "lb_udp_flows_active", svc, "Live UDP flows."),
            ("s_err", c, "lb_service_connection_errors", [*svc, "reason"],
             "Clients refused or dropped, by reason."),
            ("s_tpl", g, "lb_persistence_templates", svc, "Live persistence templates."),
            ("b_active", g, "lb_backend_connections_active", be,
             "Active connections (IPVS ActiveConn)."),
            ("b_inactive", g, "lb_backend_connections_inactive", be,
             "Inactive connections: closed ones in TIME_WAIT, and UDP flows (IPVS InActConn)."),
            ("b_err", c, "lb_backend_connection_errors", [*be, "reason"],
             "Failed connection attempts to the backend, by reason."),
            ("b_up", g, "lb_backend_up", [*be, "state"],
             "1 for the backend's current state, one series per state."),
            ("b_weight", g, "lb_backend_weight", be, "Configured weight, with runtime edits."),
            ("b_eweight", g, "lb_backend_effective_weight", be,
             "Weight given to the scheduler (0 unless UP)."),
            ("b_over", g, "lb_backend_overloaded", be,
             "1 while the backend is at its connection threshold."),
        ]  # fmt: skip
        f = {key: kind(name, doc, labels=labels) for key, kind, name, labels, doc in specs}
        # the counters of lb.stats.STATS, for services and for backends
        sf = {st: c(st.service_metric, st.service_help, labels=svc) for st in STATS}
        bf = {st: c(st.backend_metric, st.backend_help, labels=be) for st in STATS}
        for s in self.snapshots():
            name, dp = s.service.name, s.dataplane
            t = s.totals
            udp = s.service.protocol is Protocol.UDP
            for st, family in sf.items():
                if shown(st, s.service.protocol):
                    family.add_metric([name, dp], stat_value(t, st))
            f["s_flows" if udp else "s_active"].add_metric([name, dp], s.open)
            for reason in ErrorReason:
                f["s_err"].add_metric([name, dp, reason.value], t.errors[reason])
            f["s_tpl"].add_metric([name, dp], sum(b.persistent for b in s.backends))
            for b in s.backends:
                lbl = [name, str(b.address), dp]
                bt = b.totals
                for st, family in bf.items():
                    if shown(st, s.service.protocol):
                        family.add_metric(lbl, stat_value(bt, st))
                f["b_active"].add_metric(lbl, b.active)
                f["b_inactive"].add_metric(lbl, b.inactive)
                for reason in ErrorReason:
                    if reason not in _SERVICE_ONLY:
                        f["b_err"].add_metric([*lbl, reason.value], bt.errors[reason])
                current = backend_state_label(b)
                for state in BackendState:
                    f["b_up"].add_metric([*lbl, state.value], 1 if state is current else 0)
                f["b_weight"].add_metric(lbl, b.backend.weight if b.backend else 0)
                f["b_eweight"].add_metric(lbl, b.weight)
                f["b_over"].add_metric(lbl, 1 if b.overloaded else 0)
        yield from sf.values()
        yield from bf.values()
        yield from f.values()
        yield from self._health()
        exhausted = CounterMetricFamily(
            "lb_resource_exhausted",
            "New work (accept, connect, UDP flow, health probe) refused for want of a resource.",
            labels=["resource"],
        )
        for resource, count in EXHAUSTION.counts.items():
            exhausted.add_metric([resource], count)
        yield exhausted

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
