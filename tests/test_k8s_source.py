"""The Kubernetes source against an API server double speaking the real wire protocol
(tests/support/kube_double.py): informers, the start-up gate, coalescing, 410 recovery, outages.
The real kubernetes-asyncio client talks HTTP to it through a kubeconfig."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lb.k8s.api import Api, Resource
from lb.k8s.health import ProxyHealth, node_eligible
from lb.k8s.informer import Backoff, Informer
from lb.k8s.source import KubernetesSource, SourceMetrics
from lb.model import KubernetesSettings, Service
from tests.support.kube_double import FakeApiServer, endpoint, endpoint_slice, node, service
from tests.support.net import eventually

pytestmark = pytest.mark.timeout(60)

FAST = KubernetesSettings(min_sync_period=0.05, sync_period=30.0)


def value(metric: Any) -> float:
    return float(next(iter(metric.collect())).samples[0].value)


class ApplyRecorder:
    """The `apply` of the source: what it was given, in order."""

    def __init__(self) -> None:
        self.applied: list[tuple[Service, ...]] = []
        self.fail = False
        self.failed: list[float] = []  # when each failed apply came (the loop's time)

    async def __call__(self, services: tuple[Service, ...]) -> None:
        if self.fail:
            self.failed.append(asyncio.get_running_loop().time())
            raise RuntimeError("the dataplane refused")
        self.applied.append(services)

    @property
    def last(self) -> dict[str, list[str]]:
        """The last applied state: service name -> backend addresses."""
        assert self.applied, "nothing applied yet"
        return {s.name: [str(b.address) for b in s.backends] for s in self.applied[-1]}


class GatedApi:
    """The real Api, with the listing of EndpointSlices held until `release`."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.gate = asyncio.Event()

    async def list_page(self, r: Resource, limit: int, token: str | None) -> dict[str, Any]:
        if r.kind == "EndpointSlice":
            await self.gate.wait()
        return await self.api.list_page(r, limit, token)

    def watch(self, r: Resource, version: str) -> AsyncIterator[dict[str, Any]]:
        return self.api.watch(r, version)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    s = FakeApiServer()
    await s.start()
    s.put(node("node-1", "192.168.0.10"))
    yield s
    await s.stop()


@pytest.fixture
async def api(server: FakeApiServer, tmp_path: Path) -> AsyncIterator[Api]:
    path = tmp_path / "kubeconfig"
    server.write_kubeconfig(path)
    a = await Api.connect(str(path))
    yield a
    await a.close()


def source(
    reader: Any, api: Api, apply: ApplyRecorder, settings: KubernetesSettings = FAST
) -> KubernetesSource:
    return KubernetesSource(
        reader,
        services=api.services,
        endpoint_slices=api.endpoint_slices,
        node=api.node("node-1"),
        node_name="node-1",
        settings=settings,
        apply=apply,
        metrics=SourceMetrics(CollectorRegistry()),
        backoff=lambda: Backoff(initial=0.05, cap=0.2),
    )


def web(n: int = 0) -> dict[str, Any]:
    return service(f"web{n}", cluster_ip=f"10.96.0.{10 + n}")


def web_n_slice(n: int, *ips: str, trigger: str | None = None) -> dict[str, Any]:
    return endpoint_slice(
        f"web{n}-abc", f"web{n}", endpoints=[endpoint(ip) for ip in ips], trigger_time=trigger
    )


async def test_nothing_is_applied_before_services_slices_and_node_are_listed(
    server: FakeApiServer, api: Api
) -> None:
    server.put(web())
    server.put(web_n_slice(0, "10.244.1.5"))
    gated = GatedApi(api)
    rec = ApplyRecorder()
    src = source(gated, api, rec)
    src.start()
    try:
        await eventually(lambda: src.services.synced.is_set() and src.node.synced.is_set())
        await asyncio.sleep(0.3)  # services known, endpoints not: a partial view
        assert rec.applied == []
        gated.gate.set()
        await asyncio.wait_for(src.first_sync(), 5)
        assert rec.applied[0] == rec.applied[-1]
        assert rec.last == {"default/web0:http": ["10.244.1.5:8080"]}
    finally:
        await src.stop()


async def test_changes_are_coalesced_and_the_sync_period_resyncs(
    server: FakeApiServer, api: Api
) -> None:
    rec = ApplyRecorder()
    src = source(api, api, rec, replace(FAST, min_sync_period=0.5, sync_period=1.0))
    src.start()
    try:
        await asyncio.wait_for(src.first_sync(), 5)
        before = len(rec.applied)
        for i in range(20):  # a burst of changes well within one min_sync_period
            server.put(web(i))
        await eventually(lambda: len(rec.last) == 20, timeout=5)
        assert len(rec.applied) - before <= 2  # at most one sync per 0.5 s, not 20
        quiet = len(rec.applied)
        await asyncio.sleep(2.3)  # nothing changes: sync_period (1 s) still syncs
        assert len(rec.applied) - quiet >= 2
        assert value(src.metrics.pending) == 0
    finally:
        await src.stop()


async def test_410_relists_without_losing_or_duplicating_a_service(
    server: FakeApiServer, api: Api
) -> None:
    for i in range(3):
        server.put(web(i))
        server.put(web_n_slice(i, f"10.244.{i}.5"))
    rec = ApplyRecorder()
    src = source(api, api, rec)
    src.start()
    try:
        await asyncio.wait_for(src.first_sync(), 5)
        assert sorted(rec.last) == ["default/web0:http", "default/web1:http", "default/web2:http"]
        lists = src.services.lists
        # the watches break; while they are down, things change and history is compacted:
        # the client's next watch is from a version the server no longer has -> 410
        await server.wait_for_watches(3, 5)
        await server.drop_connections()
        server.delete("Service", "default", "web0")
        server.put(web(3))
        server.put(web_n_slice(3, "10.244.3.5"))
        server.put(web_n_slice(1, "10.244.1.5", "10.244.1.6"))
        server.compact()
        expected = {
            "default/web1:http": ["10.244.1.5:8080", "10.244.1.6:8080"],
            "default/web2:http": ["10.244.2.5:8080"],
            "default/web3:http": ["10.244.3.5:8080"],
        }
        # the informers re-list each on its own: wait for both to be through
        await eventually(lambda: bool(rec.applied) and rec.last == expected, timeout=10)
        assert src.services.lists > lists  # it re-listed
        names = [s.name for s in rec.applied[-1]]
        assert len(names) == len(set(names))
        # and the watch resumed from the new list: live changes flow again
        server.put(web(4))
        await eventually(lambda: "default/web4:http" in rec.last, timeout=5)
    finally:
        await src.stop()


async def test_a_410_error_event_on_a_live_watch_relists(server: FakeApiServer, api: Api) -> None:
    server.put(web())
    rec = ApplyRecorder()
    src = source(api, api, rec)
    src.start()
    try:
        await asyncio.wait_for(src.first_sync(), 5)
        lists = src.slices.lists
        await server.wait_for_watches(3, 5)
        server.expire_watches()
        await eventually(lambda: src.slices.lists > lists, timeout=5)
        server.put(web_n_slice(0, "10.244.9.9"))
        await eventually(lambda: rec.last == {"default/web0:http": ["10.244.9.9:8080"]}, timeout=5)
    finally:
        await src.stop()


async def test_api_outage_keeps_the_last_state_and_recovers(
    server: FakeApiServer, api: Api
) -> None:
    server.put(web())
    server.put(web_n_slice(0, "10.244.1.5"))
    rec = ApplyRecorder()
    src = source(api, api, rec)
    src.start()
    try:
        await asyncio.wait_for(src.first_sync(), 5)
        port = int(server.url.rsplit(":", 1)[1])
        await server.stop()
        await asyncio.sleep(1.0)  # several failed reconnects
        assert rec.last == {"default/web0:http": ["10.244.1.5:8080"]}  # nothing was emptied
        assert src.services.store  # the last known objects are kept
        await server.start(port)
        server.put(web_n_slice(0, "10.244.1.5", "10.244.1.6"))
        await eventually(
            lambda: rec.last == {"default/web0:http": ["10.244.1.5:8080", "10.244.1.6:8080"]},
            timeout=10,
        )
    finally:
        await src.stop()


async def test_bookmarks_advance_the_resource_version(server: FakeApiServer, api: Api) -> None:
    rec = ApplyRecorder()
    src = source(api, api, rec)
    src.start()
    try:
        await asyncio.wait_for(src.first_sync(), 5)
        await server.wait_for_watches(3, 5)
        server.put(node("node-2", "192.168.0.11"))  # another node: not watched here
        server.bookmark()
        await eventually(
            lambda: int(src.node.resource_version) == int(server.resource_version), timeout=5
        )
    finally:
        await src.stop()


async def test_a_failed_apply_is_retried_and_programming_latency_is_measured(
    server: FakeApiServer, api: Api
) -> None:
    rec = ApplyRecorder()
    src = source(api, api, rec, replace(FAST, sync_period=0.3))
    src.start()
    try:
        await asyncio.wait_for(src.first_sync(), 5)
        rec.fail = True
        server.put(web())
        server.put(web_n_slice(0, "10.244.1.5", trigger="2026-01-01T00:00:00Z"))
        await asyncio.sleep(0.4)
        assert value(src.metrics.pending) > 0
        rec.fail = False
        await eventually(lambda: rec.last == {"default/web0:http": ["10.244.1.5:8080"]}, 5)
        observed = next(iter(src.metrics.programming.collect())).samples
        count = next(s.value for s in observed if s.name.endswith("_count"))
        total = next(s.value for s in observed if s.name.endswith("_sum"))
        assert count == 1 and total > 3600  # since 2026-01-01: an old trigger, a long latency
    finally:
        await src.stop()


async def test_a_sync_translates_the_services_whose_slices_moved_or_went(
    server: FakeApiServer, api: Api
) -> None:
    """Each sync translates only the Services its changes name: an EndpointSlice's
    Service before and after a change of its label, and every Service for the Node."""
    rec = ApplyRecorder()
    server.put(web(0))
    server.put(web(1))
    server.put(web_n_slice(0, "10.244.0.5"))
    src = source(api, api, rec)
    src.start()
    try:
        await asyncio.wait_for(src.first_sync(), 5)
        assert rec.last == {"default/web0:http": ["10.244.0.5:8080"], "default/web1:http": []}
        moved = web_n_slice(0, "10.244.0.5")  # web0-abc, now labelled for web1
        moved["metadata"]["labels"]["kubernetes.io/service-name"] = "web1"
        server.put(moved)
        await eventually(lambda: rec.last["default/web1:http"] == ["10.244.0.5:8080"], 5)
        assert rec.last["default/web0:http"] == []
        server.delete("EndpointSlice", "default", "web0-abc")
        await eventually(lambda: rec.last["default/web1:http"] == [], 5)
        nodeport = web(2)
        nodeport["spec"] |= {"type": "NodePort"}
        nodeport["spec"]["ports"][0]["nodePort"] = 30080
        server.put(nodeport)
        await eventually(lambda: "default/web2:http@192.168.0.10:30080" in rec.last, 5)
        server.put(node("node-1", "192.168.0.11"))  # the node's address changed
        await eventually(lambda: "default/web2:http@192.168.0.11:30080" in rec.last, 5)
        assert "default/web2:http@192.168.0.10:30080" not in rec.last
    finally:
        await src.stop()


async def test_a_failed_sync_is_retried_with_a_backoff_from_min_sync_period(
    server: FakeApiServer, api: Api
) -> None:
    rec = ApplyRecorder()
    src = source(api, api, rec, replace(FAST, min_sync_period=0.05, sync_period=0.4))
    src.start()
    try:
        await asyncio.wait_for(src.first_sync(), 5)
        rec.fail = True
        server.put(web())
        await eventually(lambda: len(rec.failed) >= 6, timeout=10)
        # the retries: after min_sync_period, doubling up to sync_period, not sync_period
        # each time (and whatever else the loop does in between)
        gaps = [b - a for a, b in zip(rec.failed, rec.failed[1:6], strict=False)]
        for gap, expected in zip(gaps, [0.05, 0.1, 0.2, 0.4, 0.4], strict=True):
            assert expected * 0.9 <= gap <= expected + 0.2, gaps
        rec.fail = False
        await eventually(lambda: "default/web0:http" in rec.last, timeout=5)
        assert value(src.metrics.pending) == 0
        # a good sync starts the backoff again from min_sync_period
        rec.fail, rec.failed = True, []
        server.put(web(1))
        await eventually(lambda: len(rec.failed) >= 2, timeout=5)
        assert 0.045 <= rec.failed[1] - rec.failed[0] <= 0.25
        rec.fail = False
        await eventually(lambda: "default/web1:http" in rec.last, timeout=5)
    finally:
        await src.stop()


async def test_lists_are_read_in_pages_and_an_expired_continue_token_relists(
    server: FakeApiServer, api: Api
) -> None:
    for i in range(5):
        server.put(web(i))
    seen: list[tuple[str, Any]] = []
    informer = Informer(
        api,
        api.services,
        lambda kind, key, obj: seen.append((key[1], obj is not None)),
        page_size=2,
        backoff=Backoff(initial=0.01, cap=0.05),
    )
    await informer._list()  # one list, without the watch that follows
    assert sorted(informer.store) == [("default", f"web{i}") for i in range(5)]
    pages = [q for path, q in server.requests if path == "/api/v1/services"]
    assert len(pages) == 3 and sum("continue=" in q for q in pages) == 2
    assert sorted(seen) == [(f"web{i}", True) for i in range(5)]
    # a continue token that expires between pages: the list starts over, whole
    errors: list[str] = []
    fresh = Informer(
        api,
        api.services,
        lambda kind, key, obj: None,
        page_size=2,
        backoff=Backoff(initial=0.01, cap=0.05),
        on_error=lambda kind, reason: errors.append(reason),
    )
    original = api.list_page
    first = True

    async def list_page(r: Resource, limit: int, token: str | None) -> dict[str, Any]:
        nonlocal first
        page = await original(r, limit, token)
        if first:  # the snapshot behind the first page's continue token goes
            first = False
            server.compact()
        return page

    api.list_page = list_page  # type: ignore[method-assign,assignment]
    task = asyncio.get_running_loop().create_task(fresh.run())
    try:
        await asyncio.wait_for(fresh.synced.wait(), 5)
        assert errors == ["gone"]
        assert sorted(fresh.store) == [("default", f"web{i}") for i in range(5)]
    finally:
        task.cancel()


async def test_proxy_health_turns_unhealthy_when_syncs_stop_and_back_when_they_resume(
    server: FakeApiServer, api: Api
) -> None:
    """kube-proxy's rule: a change queued longer than twice the sync period without a sync
    applying it makes /healthz and /livez 503."""
    rec = ApplyRecorder()
    src = source(api, api, rec, replace(FAST, sync_period=0.2))  # unhealthy after 0.4 s
    src.start()
    health = src.health.health
    try:
        await asyncio.wait_for(src.first_sync(), 5)
        assert health.healthz(time.time())[0] == 200
        rec.fail = True  # the dataplane refuses every sync from now on
        server.put(web())
        await asyncio.sleep(0.1)
        assert health.livez(time.time())[0] == 200  # queued, not late yet
        await eventually(lambda: health.livez(time.time())[0] == 503, 5)
        status, body = health.healthz(time.time())
        assert status == 503 and body["nodeEligible"] is True
        rec.fail = False
        await eventually(lambda: health.healthz(time.time())[0] == 200, 5)
    finally:
        await src.stop()


def test_proxy_health_over_time() -> None:
    h = ProxyHealth(timeout=60)
    assert h.healthz(0)[0] == 200  # starting up: healthy
    h.queued(100)
    h.syncing()
    h.queued(130)  # arrives while the sync runs: waits for the next one
    h.failed()
    assert h.livez(159)[0] == 200 and h.livez(160)[0] == 503  # the oldest, from 100
    h.syncing()
    h.updated(165)
    assert h.livez(165)[0] == 200
    h.queued(170)
    h.syncing()
    h.updated(171)
    status, body = h.healthz(500)
    assert status == 200 and body["lastUpdated"] == body["currentTime"]  # as kube-proxy
    h.queued(500)
    status, body = h.livez(600)
    assert status == 503 and body["lastUpdated"].startswith("1970-01-01T00:02:51")


def test_node_eligibility() -> None:
    n = node("node-1", "192.168.0.10")
    assert node_eligible(n) and node_eligible(None)
    assert not node_eligible({**n, "metadata": {**n["metadata"], "deletionTimestamp": "x"}})
    taint = {"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}
    assert not node_eligible({**n, "spec": {"taints": [taint]}})
    assert node_eligible({**n, "spec": {"taints": [{**taint, "key": "other"}]}})
