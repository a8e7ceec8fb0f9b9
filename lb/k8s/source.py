"""Kubernetes as a source of services: informers in, coalesced syncs out.

- Start-up gate: nothing is applied before Services, EndpointSlices and this node have
  each been listed once (kube-proxy's rule: a restarted proxy must not program a partial
  view, e.g. services without their endpoints).
- Coalescing: changes mark the state dirty; a sync runs at most once per
  `min_sync_period` and at least once per `sync_period`. A sync that failed is retried
  after `min_sync_period`, then twice as long after each failure in a row, up to
  `sync_period`. Each sync translates only the Services whose objects changed: the
  changes name them (a Service, or the owner of an EndpointSlice), and the translation
  (pure, lb/k8s/translate.py) visits only those, keeping the very services of last time
  for the others; it hands the services to `apply`, and the dataplanes change only what
  differs. A change of the Node translates every Service.
- While the API is unreachable the informers keep their stores: the last known state
  serves on, and nothing is applied until something changes again.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lb.k8s.api import Api
from lb.k8s.health import ProxyHealth, node_eligible
from lb.k8s.health_server import HealthServers
from lb.k8s.informer import Backoff, Informer, Object, Reader
from lb.k8s.translate import (
    Memo,
    Node,
    ObjectKey,
    Translation,
    node_addresses,
    node_zone,
    slice_owner,
    translate,
    translate_changed,
)
from lb.log import emit
from lb.model import KubernetesSettings, Service

log = logging.getLogger("lb.k8s")

TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
#: kube-proxy's buckets for network_programming_duration_seconds (0.25 s, 0.5 s, then each
#: second to 60 s, each 5 s to 2 min, each 30 s to 5 min), and finer ones under 2 s,
#: where lb's figures are: a superset, so that every `le` of kube-proxy's is here too.
LATENCY_BUCKETS = tuple(
    sorted(
        {0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.25, 1.5, 1.75}
        | {float(s) for s in range(1, 61)}
        | {float(s) for s in range(65, 120, 5)}
        | {float(s) for s in range(120, 301, 30)}
    )
)
#: The first retry of a failed sync when min_sync_period is 0 (seconds).
RETRY_MIN = 0.1
SYNC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

Apply = Callable[[tuple[Service, ...]], Awaitable[None]]


class SourceMetrics:
    """kube-proxy's sync metrics, under lb_kubernetes_*."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.sync_seconds = Histogram(
            "lb_kubernetes_sync_duration_seconds",
            "Time to translate and apply the Kubernetes state (one sync).",
            buckets=SYNC_BUCKETS,
            registry=registry,
        )
        self.pending = Gauge(
            "lb_kubernetes_sync_pending_changes",
            "Changes to Services, EndpointSlices and the Node not applied yet.",
            registry=registry,
        )
        self.changes = Counter(
            "lb_kubernetes_changes",
            "Changes to Services, EndpointSlices and the Node received, by kind.",
            ["kind"],
            registry=registry,
        )
        self.programming = Histogram(
            "lb_kubernetes_network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to the dataplanes applying it.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.api_errors = Counter(
            "lb_kubernetes_api_errors",
            "List and watch failures, by kind and reason (gone: 410, re-listed).",
            ["kind", "reason"],
            registry=registry,
        )
        self.last_sync = Gauge(
            "lb_kubernetes_last_sync_timestamp_seconds",
            "When the last successful sync finished (Unix time).",
            registry=registry,
        )
        self.services = Gauge(
            "lb_kubernetes_services",
            "lb services programmed from Kubernetes.",
            registry=registry,
        )
        for kind in ("Service", "EndpointSlice", "Node"):
            self.changes.labels(kind)


class KubernetesSource:
    def __init__(
        self,
        reader: Reader,
        *,
        services: Any,
        endpoint_slices: Any,
        node: Any,
        node_name: str,
        settings: KubernetesSettings,
        apply: Apply,
        metrics: SourceMetrics | None = None,
        health: HealthServers | None = None,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        self.node_name = node_name
        self.settings = settings
        self.apply = apply
        self.metrics = metrics or SourceMetrics()
        self.health = health or HealthServers(ProxyHealth(2 * settings.sync_period))
        self.informers = [
            Informer(reader, r, self._changed, backoff=backoff(), on_error=self._api_error)
            for r in (services, endpoint_slices, node)
        ]
        self.services, self.slices, self.node = self.informers
        self.translation = Translation(())
        self._memo = Memo()
        self.syncs = 0
        self._dirty = asyncio.Event()
        self._pending = 0
        self._triggers: dict[ObjectKey, str] = {}  # each slice's last trigger time
        #: the Services to translate again at the next sync (None: every one)
        self._changed_keys: set[ObjectKey] | None = None
        self._owners: dict[ObjectKey, ObjectKey] = {}  # each EndpointSlice's Service
        self._slices_of: dict[ObjectKey, dict[ObjectKey, Object]] = {}  # by Service
        self._retry = 0.0  # after failed syncs: the wait before the next one
        self._waiting: list[float] = []  # trigger times (Unix) not applied yet
        self._tasks: list[asyncio.Task[None]] = []
        self._synced_once = asyncio.Event()

    @classmethod
    def from_api(
        cls,
        api: Api,
        node_name: str,
        settings: KubernetesSettings,
        apply: Apply,
        *,
        metrics: SourceMetrics | None = None,
        health: HealthServers | None = None,
    ) -> KubernetesSource:
        return cls(
            api,
            services=api.services,
            endpoint_slices=api.endpoint_slices,
            node=api.node(node_name),
            node_name=node_name,
            settings=settings,
            apply=apply,
            metrics=metrics,
            health=health,
        )

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(i.run()) for i in self.informers]
        self._tasks.append(loop.create_task(self._run()))

    async def first_sync(self) -> None:
        """Wait for the start-up gate and the first sync after it."""
        await self._synced_once.wait()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks = []

    # --- changes ------------------------------------------------------------------------

    def _changed(self, kind: str, key: ObjectKey, obj: Object | None) -> None:
        self.health.health.queued(time.time())
        self._pending += 1
        self.metrics.changes.labels(kind).inc()
        self.metrics.pending.set(self._pending)
        if kind == "Service":
            self._mark(key)
        elif kind == "Node":
            self.health.health.node_eligible = node_eligible(obj)
            self._changed_keys = None  # its addresses and zone are every Service's
        else:
            self._reindex(key, obj)
            trigger = ((obj or {}).get("metadata") or {}).get("annotations", {}).get(TRIGGER_TIME)
            if obj is None:
                self._triggers.pop(key, None)
            elif trigger and trigger != self._triggers.get(key):
                self._triggers[key] = trigger
                when = _unix_time(trigger)
                if when is not None:
                    self._waiting.append(when)
        self._dirty.set()

    def _mark(self, key: ObjectKey) -> None:
        if self._changed_keys is not None:
            self._changed_keys.add(key)

    def _reindex(self, key: ObjectKey, obj: Object | None) -> None:
        """An EndpointSlice changed: its Service (before and after) is to translate."""
        old = self._owners.pop(key, None)
        if old is not None:
            slices = self._slices_of[old]
            del slices[key]
            if not slices:
                del self._slices_of[old]
            self._mark(old)
        owner = slice_owner(obj) if obj is not None else None
        if obj is not None and owner is not None:
            self._owners[key] = owner
            self._slices_of.setdefault(owner, {})[key] = obj
            self._mark(owner)

    def _api_error(self, kind: str, reason: str) -> None:
        self.metrics.api_errors.labels(kind, reason).inc()

    # --- syncing ------------------------------------------------------------------------

    async def _run(self) -> None:
        await asyncio.gather(*(i.synced.wait() for i in self.informers))
        emit(
            log,
            logging.INFO,
            "k8s.synced",
            f"listed {len(self.services.store)} Services, {len(self.slices.store)} "
            f"EndpointSlices and node {self.node_name!r}"
            + ("" if self.node.store else " (not found: no node port is served)"),
            services=len(self.services.store),
            endpoint_slices=len(self.slices.store),
        )
        loop = asyncio.get_running_loop()
        last = -float("inf")
        while True:
            wait = max(0.0, last + self.settings.min_sync_period - loop.time())
            if wait:
                await asyncio.sleep(wait)
            last = loop.time()
            if not await self._sync():
                await asyncio.sleep(self._retry)  # the changes meanwhile go with the retry
                continue
            try:
                async with asyncio.timeout(self.settings.sync_period):
                    await self._dirty.wait()
            except TimeoutError:
                pass

    async def _sync(self) -> bool:
        """Translate and apply; False if the apply failed (then `_retry` says when to try
        again)."""
        self._dirty.clear()
        pending, self._pending = self._pending, 0
        waiting, self._waiting = self._waiting, []
        start = time.perf_counter()
        self.health.health.syncing()
        nodes = list(self.node.store.values())
        addresses = self.settings.nodeport_addresses or node_addresses(nodes[0] if nodes else None)
        node = Node(self.node_name, addresses, node_zone(nodes[0] if nodes else None))
        scheduler = self.settings.default_scheduler
        changed, self._changed_keys = self._changed_keys, set()
        if changed is None or not self._memo.current(node, scheduler):
            translation = translate(
                self.services.store.values(),
                self.slices.store.values(),
                node,
                scheduler,
                self._memo,
            )
        else:
            objects = self.services.store
            translation = translate_changed(
                self._memo,
                {k: (objects.get(k), self._slices_of.get(k, {}).values()) for k in changed},
                node,
                scheduler,
            )
        for line in sorted(set(translation.skipped) - set(self.translation.skipped)):
            emit(log, logging.WARNING, "k8s.skipped", line)
        try:
            await self.apply(translation.services)
        except Exception as e:
            self.health.health.failed()
            self._pending += pending  # applied by the retry (the translation has them)
            self._waiting = waiting + self._waiting
            self.metrics.pending.set(self._pending)
            first = self.settings.min_sync_period or RETRY_MIN
            self._retry = min(self.settings.sync_period, 2 * self._retry if self._retry else first)
            emit(
                log,
                logging.ERROR,
                "k8s.sync_failed",
                f"applying {len(translation.services)} services from Kubernetes failed: {e}; "
                f"retrying in {self._retry:g}s",
                retry_in=self._retry,
            )
            return False
        self._retry = 0.0
        done = time.time()
        self.health.health.updated(done)
        await self.health.sync(translation.health_checks, addresses)
        self.translation = translation
        self.syncs += 1
        self.metrics.sync_seconds.observe(time.perf_counter() - start)
        self.metrics.pending.set(self._pending)
        self.metrics.last_sync.set(done)
        self.metrics.services.set(len(translation.services))
        for when in waiting:
            self.metrics.programming.observe(max(0.0, done - when))
        if not self._synced_once.is_set():
            self._synced_once.set()
            emit(
                log,
                logging.INFO,
                "k8s.first_sync",
                f"programmed {len(translation.services)} services from Kubernetes",
                services=len(translation.services),
            )
        return True


def _unix_time(text: str) -> float | None:
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()
