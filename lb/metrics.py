"""Prometheus metrics, read from the dataplanes' own counters at scrape time.

Nothing on the data path touches prometheus-client: relays bump plain integers
(lb.stats.Counters), and /metrics turns `observe()` snapshots into text when Prometheus
scrapes. Rare events (reloads, applies) use prometheus-client's objects, in `registry`.

The snapshots' families (per service, and per backend when `admin.backend_metrics` asks
for them) are written here directly, not through prometheus-client: its exposition costs
~10 us a sample, seconds at 10,000 services. `page()` builds them service by service and
lets the event loop run every few milliseconds, so that a scrape never stalls lb.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from lb import __version__
from lb.exhaustion import EXHAUSTION
from lb.health.monitor import Monitor
from lb.model import BackendState, Endpoint, Protocol, ServiceKey
from lb.stats import STATS, BackendSnapshot, ErrorReason, ServiceSnapshot, Stat, shown

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

#: The longest `page()` keeps the event loop before letting it run (seconds).
SLICE = 0.005
#: Lines joined at once: the page is written in parts of about a hundred kB each.
CHUNK = 2000

#: Reasons that are never a backend's: counted for the service only.
_SERVICE_ONLY = (ErrorReason.NO_BACKEND, ErrorReason.EXHAUSTED)
_BACKEND_REASONS = tuple(r for r in ErrorReason if r not in _SERVICE_ONLY)

Observe = Callable[[ServiceKey | None], list[ServiceSnapshot]]
Monitors = Callable[[], Mapping[tuple[ServiceKey, Endpoint], Monitor]]


def backend_state_label(b: BackendSnapshot) -> BackendState:
    """A backend removed from the config but still draining shows as DRAIN."""
    return b.backend.state if b.backend is not None else BackendState.DRAIN


def _label(value: str) -> str:
    """A label value as the text format quotes it."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


class _Family:
    """One metric family of the page: its header and its sample lines, each line
    `name{labels} value` (a counter's name with _total, as prometheus-client writes it)."""

    __slots__ = ("header", "lines", "name")

    def __init__(self, name: str, kind: str, doc: str) -> None:
        self.name = f"{name}_total" if kind == "counter" else name
        self.header = f"# HELP {self.name} {doc}\n# TYPE {self.name} {kind}\n"
        self.lines: list[str] = []

    def text(self) -> Iterator[bytes]:
        """The family's text, in parts of at most CHUNK lines."""
        lines = self.lines
        yield (self.header + "".join(lines[:CHUNK])).encode()
        for i in range(CHUNK, len(lines), CHUNK):
            yield "".join(lines[i : i + CHUNK]).encode()


def _stats(families: list[tuple[Stat, _Family]]) -> dict[Protocol, list[tuple[str, _Family]]]:
    """For each protocol, the STATS it shows: (attribute, family)."""
    return {p: [(st.attr, f) for st, f in families if shown(st, p)] for p in Protocol}


class _Page:
    """The snapshots' families, filled service by service (`add`) and health check by
    health check (`health`), in the family order of `families`."""

    def __init__(self, backends: bool) -> None:
        F = _Family
        services = [(st, F(st.service_metric, "counter", st.service_help)) for st in STATS]
        self.stats = _stats(services)
        self.active = F("lb_service_connections_active", "gauge", "Open client connections (TCP).")
        self.flows = F("lb_udp_flows_active", "gauge", "Live UDP flows.")
        self.errors = F(
            "lb_service_connection_errors", "counter", "Clients refused or dropped, by reason."
        )
        self.templates = F("lb_persistence_templates", "gauge", "Live persistence templates.")
        self.states = F(
            "lb_service_backends",
            "gauge",
            "The service's backends in each state (lb_backend_up's).",
        )
        self.families = [f for _, f in services]
        self.families += [self.active, self.flows, self.errors, self.templates, self.states]
        self.backends = backends
        if not backends:
            return
        per_backend = [(st, F(st.backend_metric, "counter", st.backend_help)) for st in STATS]
        self.b_stats = _stats(per_backend)
        self.b_gauges = [
            F("lb_backend_connections_active", "gauge", "Active connections (IPVS ActiveConn)."),
            F(
                "lb_backend_connections_inactive",
                "gauge",
                "Inactive connections: closed ones in TIME_WAIT, and UDP flows (IPVS InActConn).",
            ),
            F("lb_backend_weight", "gauge", "Configured weight, with runtime edits."),
            F(
                "lb_backend_effective_weight",
                "gauge",
                "Weight given to the scheduler (0 unless UP).",
            ),
            F(
                "lb_backend_overloaded",
                "gauge",
                "1 while the backend is at its connection threshold.",
            ),
        ]
        self.b_errors = F(
            "lb_backend_connection_errors",
            "counter",
            "Failed connection attempts to the backend, by reason.",
        )
        self.b_up = F(
            "lb_backend_up", "gauge", "1 for the backend's current state, one series per state."
        )
        self.checks = F("lb_health_checks", "counter", "Health checks run.")
        self.fails = F("lb_health_check_failures", "counter", "Health checks failed.")
        self.moves = F("lb_health_check_transitions", "counter", "UP/DOWN transitions from checks.")
        self.families += [f for _, f in per_backend]
        self.families += [*self.b_gauges, self.b_errors, self.b_up]
        self.families += [self.checks, self.fails, self.moves]

    def add(self, s: ServiceSnapshot) -> None:
        """One snapshot's lines."""
        labels = f'service="{_label(s.service.name)}",dataplane="{_label(s.dataplane)}"'
        t = s.totals
        protocol = s.service.protocol
        for attr, f in self.stats[protocol]:
            f.lines.append(f"{f.name}{{{labels}}} {getattr(t, attr)}\n")
        f = self.flows if protocol is Protocol.UDP else self.active
        f.lines.append(f"{f.name}{{{labels}}} {s.open}\n")
        f, errors = self.errors, t.errors
        f.lines += [f'{f.name}{{{labels},reason="{r}"}} {errors[r]}\n' for r in ErrorReason]
        f = self.templates
        f.lines.append(f"{f.name}{{{labels}}} {sum(b.persistent for b in s.backends)}\n")
        count = dict.fromkeys(BackendState, 0)
        for b in s.backends:
            count[backend_state_label(b)] += 1
        f = self.states
        f.lines += [f'{f.name}{{{labels},state="{k}"}} {n}\n' for k, n in count.items()]
        if self.backends:
            for b in s.backends:
                self._backend(labels, protocol, b)

    def _backend(self, service: str, protocol: Protocol, b: BackendSnapshot) -> None:
        labels = f'{service},backend="{b.address}"'
        t = b.totals
        for attr, f in self.b_stats[protocol]:
            f.lines.append(f"{f.name}{{{labels}}} {getattr(t, attr)}\n")
        weight = b.backend.weight if b.backend is not None else 0
        values = (b.active, b.inactive, weight, b.weight, 1 if b.overloaded else 0)
        for f, value in zip(self.b_gauges, values, strict=True):
            f.lines.append(f"{f.name}{{{labels}}} {value}\n")
        f, errors = self.b_errors, t.errors
        f.lines += [f'{f.name}{{{labels},reason="{r}"}} {errors[r]}\n' for r in _BACKEND_REASONS]
        f, current = self.b_up, backend_state_label(b)
        f.lines += [
            f'{f.name}{{{labels},state="{state}"}} {1 if state is current else 0}\n'
            for state in BackendState
        ]

    def health(self, m: Monitor, address: Endpoint) -> None:
        labels = f'service="{_label(m.service)}",backend="{address}"'
        self.checks.lines.append(f"{self.checks.name}{{{labels}}} {m.checks}\n")
        self.fails.lines.append(f"{self.fails.name}{{{labels}}} {m.failures}\n")
        name = self.moves.name
        self.moves.lines += [
            f'{name}{{{labels},to="up"}} {m.went_up}\n',
            f'{name}{{{labels},to="down"}} {m.went_down}\n',
        ]


class _Exhaustion(Collector):
    def collect(self) -> Iterable[Metric]:
        exhausted = CounterMetricFamily(
            "lb_resource_exhausted",
            "New work (accept, connect, UDP flow, health probe) refused for want of a resource.",
            labels=["resource"],
        )
        for resource, count in EXHAUSTION.counts.items():
            exhausted.add_metric([resource], count)
        yield exhausted


class Metrics:
    """What /metrics serves: the registry of the few metrics recorded as events happen
    (and lb_kubernetes_*), and the snapshots' families, read at each scrape from
    `observe(key)` for each of `services()` and from `monitors()`."""

    def __init__(
        self,
        observe: Observe,
        services: Callable[[], Iterable[ServiceKey]],
        monitors: Monitors,
        *,
        backends: bool = False,
    ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.observe = observe
        self.services = services
        self.monitors = monitors
        #: per-backend series too (admin.backend_metrics): 19 per backend, where a service
        #: has 18
        self.backends = backends
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
        self.registry.register(_Exhaustion())

    def record_sync(self, dataplane: str, seconds: float) -> None:
        self.sync_seconds.labels(dataplane).observe(seconds)

    def text(self) -> bytes:
        """The whole page, at once."""
        build = self._build()
        while True:
            try:
                next(build)
            except StopIteration as done:
                parts: list[bytes] = done.value
                return b"".join(parts)

    async def page(self) -> list[bytes]:
        """The whole page, in parts, built in slices of at most SLICE seconds of the event
        loop."""
        build = self._build()
        loop = asyncio.get_running_loop()
        until = loop.time() + SLICE
        while True:
            try:
                next(build)
            except StopIteration as done:
                parts: list[bytes] = done.value
                return parts
            if loop.time() >= until:
                await asyncio.sleep(0)
                until = loop.time() + SLICE

    def _build(self) -> Generator[None, None, list[bytes]]:
        """The page's parts; yields where it may pause: after each service, health check
        and part."""
        page = _Page(self.backends)
        for key in list(self.services()):
            for snap in self.observe(key):
                page.add(snap)
            yield
        if self.backends:
            for (_, address), m in list(self.monitors().items()):
                page.health(m, address)
                yield
        parts = [generate_latest(self.registry)]
        for family in page.families:
            for part in family.text():
                parts.append(part)
                yield
            family.lines = []  # written: its lines can go
        return parts
