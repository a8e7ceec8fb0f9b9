"""`lb run --source kubernetes` at scale, against the API server double of the tests
(tests/support/kube_double.py: the real wire protocol, lists in pages, watches).

For N Services of one port, each with one EndpointSlice of 10 ready endpoints:
- `double`: the double alone, in the bench's process: the time to load the 2N objects
  (and the node), and for one client to list them all in pages of 500 (lb's informer's
  page size), as raw bytes (plain aiohttp GETs: the double's work and the transfer) and
  through lb's own client (`lb.k8s.api.Api`: kubernetes-asyncio and the JSON decoding
  lb's informer does), `runs` times each;
- `lb`: for each dataplane, `runs` starts of `lb run --source kubernetes` in a namespace
  of its own, the double listening on that namespace's loopback: `start`, from the
  command to /readyz answering 200 (which the source gives once Services, EndpointSlices
  and the node are listed and the first sync applied), with its phases from lb's log
  (`up`: lb.started, the API connected and the informers started; `listed`: k8s.synced;
  `programmed`: k8s.first_sync); after the last start, its RSS and idle CPU (as
  bench/scale.py measures them);
- `churn`, at the largest size: EndpointSlice updates at a steady rate (CHURN_RATES) for
  a bounded time, each replacing one endpoint of a slice (a pod rescheduled) and setting
  `endpoints.kubernetes.io/last-change-trigger-time` to the moment of the change, as the
  EndpointSlice controller does. lb's `lb_kubernetes_network_programming_duration_seconds`
  (from that time to the dataplanes applying the change) is read from /metrics before
  and after: p50 and p99 interpolated within its buckets as Prometheus's
  histogram_quantile does (lb logs no event per sync, so there is no exact figure per
  change), the bucket each falls in, the exact mean (sum / count); with the syncs it took
  and their mean duration (`lb_kubernetes_sync_duration_seconds`), lb's CPU while the
  updates came, and `caught_up`: from the last update to lb's admin API showing it.
  The trigger time is set by the bench when it writes the object: the figure is lb's
  part of the SLI (watch delivery, coalescing, translation, apply), not the endpoint
  controller's.

/metrics is read only between the rates, never while updates come or are applied: at
10,000 services it is 15 MB and costs lb about 0.7 s of CPU (in slices that leave its
event loop free, but CPU all the same); whether the last update is applied is asked of
the admin API's one-service view instead.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import re
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.control import BACKEND_BASE, BACKENDS, VIP_BASE, Netns
from bench.scale import ADMIN, _cpu_seconds, idle, lb_running, namespace, request
from bench.stats import Summary
from lb.k8s.api import Api
from offload.netns import inside
from tests.support.kube_double import FakeApiServer, endpoint, endpoint_slice, node, service

DATAPLANES = ("userspace", "nftables")
CHURN_RATES = (10, 100)  # EndpointSlice updates per second
CHURN_SECONDS = 20.0
QUICK_CHURN_SECONDS = 1.0
#: after the last update, how long lb may take to apply what is left
CHURN_DRAIN_TIMEOUT = 300.0
PAGE = 500  # lb's informer's page size (lb/k8s/informer.py)
NODE = "lbbench-node"
NODE_IP = "10.99.0.1"
#: the addresses that replace a slice's first endpoint: one for each update of each slice
REPLACEMENT_BASE = int(ipaddress.ip_address("10.192.0.0"))
REPLACEMENT_STRIDE = 1 << 14
FAILED = "k8s.sync_failed"
PROGRAMMING = "lb_kubernetes_network_programming_duration_seconds"
SYNC = "lb_kubernetes_sync_duration_seconds"
#: lb's log events that mark the phases of a start (bench/k8s.py's docstring)
PHASES = {"up": "lb.started", "listed": "k8s.synced", "programmed": "k8s.first_sync"}
LB_YAML = f"admin:\n  listen: {ADMIN}\nshutdown_grace: 1s\n"


# --- the cluster in the double -----------------------------------------------------------


def first_endpoint(i: int, generation: int) -> str:
    """Service i's first endpoint: its own at generation 0, then another at each
    generation (a pod rescheduled again), so that lb's view of the service tells which
    update it has applied."""
    if generation == 0:
        return str(ipaddress.ip_address(BACKEND_BASE + i * BACKENDS))
    return str(ipaddress.ip_address(REPLACEMENT_BASE + generation * REPLACEMENT_STRIDE + i))


def slice_of(i: int, generation: int = 0, trigger: str | None = None) -> dict[str, Any]:
    """Service i's EndpointSlice at a generation: BACKENDS endpoints, the first one
    `first_endpoint`'s."""
    ips = [str(ipaddress.ip_address(BACKEND_BASE + i * BACKENDS + j)) for j in range(BACKENDS)]
    ips[0] = first_endpoint(i, generation)
    return endpoint_slice(
        f"s{i}-ep",
        f"s{i}",
        endpoints=[endpoint(a, node_name=NODE) for a in ips],
        trigger_time=trigger,
    )


def populated(n: int) -> FakeApiServer:
    """A double holding the node, N Services (cluster IPs from VIP_BASE, port 80 ->
    8080) and their slices."""
    api = FakeApiServer()
    api.put(node(NODE, NODE_IP))
    for i in range(n):
        api.put(service(f"s{i}", cluster_ip=str(ipaddress.ip_address(VIP_BASE + i))))
        api.put(slice_of(i))
    return api


def trigger_time() -> str:
    """Now, as the EndpointSlice controller writes it (RFC 3339, nanoseconds, UTC)."""
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


# --- the double alone ---------------------------------------------------------------------


async def _list_raw(session: aiohttp.ClientSession, url: str) -> int:
    """Every page of a list as bytes (the continue token read from the page's head, where
    the double writes its metadata): the bytes received."""
    total, token = 0, ""
    while True:
        params = {"limit": str(PAGE)} | ({"continue": token} if token else {})
        async with session.get(url, params=params) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"the double answered {resp.status} to {url}")
        total += len(body)
        found = re.search(rb'"continue": "([^"]+)"', body[:512])
        if found is None:
            return total
        token = found.group(1).decode()


async def _list_decoded(api: Api, resource: Any) -> int:
    """Every page through lb's client, as lb's informer lists: the objects."""
    items, token = 0, None
    while True:
        page = await api.list_page(resource, PAGE, token)
        items += len(page.get("items") or [])
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return items


async def measure_double(n: int, runs: int) -> dict[str, Summary]:
    start = time.perf_counter()
    api = populated(n)
    load = time.perf_counter() - start
    times: dict[str, list[float]] = {
        "list_services": [],
        "list_endpoint_slices": [],
        "list_services_decoded": [],
        "list_endpoint_slices_decoded": [],
    }
    size = 0
    await api.start()
    try:
        with tempfile.TemporaryDirectory(prefix="lbbench-k8s-") as tmp:
            kubeconfig = Path(tmp) / "kubeconfig"
            api.write_kubeconfig(kubeconfig)
            client = await Api.connect(str(kubeconfig))
            headers = {"Authorization": f"Bearer {api.token}"}
            try:
                async with aiohttp.ClientSession(headers=headers) as session:
                    for _ in range(runs):
                        for name, path, resource in (
                            ("services", "/api/v1/services", client.services),
                            (
                                "endpoint_slices",
                                "/apis/discovery.k8s.io/v1/endpointslices",
                                client.endpoint_slices,
                            ),
                        ):
                            t = time.perf_counter()
                            got = await _list_raw(session, api.url + path)
                            times[f"list_{name}"].append(time.perf_counter() - t)
                            size = got if name == "endpoint_slices" else size
                            t = time.perf_counter()
                            if await _list_decoded(client, resource) != n:
                                raise RuntimeError(f"lb's client listed other than {n} {name}")
                            times[f"list_{name}_decoded"].append(time.perf_counter() - t)
            finally:
                await client.close()
    finally:
        await api.stop()
    return {
        "load": Summary.of([load]),
        **{name: Summary.of(values) for name, values in times.items()},
        "endpoint_slices_mb": Summary.of([size / 1e6]),
    }


# --- lb against the double ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Histogram:
    """A Prometheus histogram as /metrics shows it: cumulative counts by upper bound."""

    buckets: tuple[tuple[float, float], ...]  # (le, cumulative count), +Inf last
    sum: float
    count: float

    def minus(self, before: Histogram) -> Histogram:
        """What was observed since `before` (the same buckets)."""
        return Histogram(
            tuple(
                (le, c - b) for (le, c), (_, b) in zip(self.buckets, before.buckets, strict=True)
            ),
            self.sum - before.sum,
            self.count - before.count,
        )

    def quantile(self, q: float) -> tuple[float, float, float]:
        """(estimate, bucket's lower bound, its upper bound), as histogram_quantile: linear
        within the bucket the rank falls in; in the +Inf bucket, the largest finite bound."""
        if not self.count:
            raise ValueError("an empty histogram has no quantile")
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le, cumulative in self.buckets:
            if cumulative >= rank:
                if le == float("inf"):
                    return lower, lower, le
                inside_bucket = cumulative - below
                fraction = (rank - below) / inside_bucket if inside_bucket else 1.0
                return lower + (le - lower) * fraction, lower, le
            lower, below = le, cumulative
        raise ValueError("the +Inf bucket must hold every observation")


def histogram(metrics: str, name: str) -> Histogram:
    buckets: list[tuple[float, float]] = []
    total = count = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        if key.startswith(f"{name}_bucket"):
            le = re.search(r'le="([^"]+)"', key)
            if le is not None:
                buckets.append((float(le.group(1)), float(value)))
        elif key == f"{name}_sum":
            total = float(value)
        elif key == f"{name}_count":
            count = float(value)
    if not buckets:
        raise RuntimeError(f"lb's /metrics has no {name}")
    return Histogram(tuple(sorted(buckets)), total, count)


async def lb_metrics(ns: Netns) -> str:
    """The lb_kubernetes_* lines of lb's /metrics."""
    status, answer = await request(ns, "GET", "/metrics", only=b"lb_kubernetes_")
    if status != 200:
        raise RuntimeError(f"lb's /metrics answered {status}")
    return answer.decode()


class Churn:
    """EndpointSlice updates into the double, service after service."""

    def __init__(self, api: FakeApiServer, n: int) -> None:
        self.api = api
        self.n = n
        self.sent = 0

    async def measure(self, ns: Netns, pid: int, quick: bool) -> dict[int, dict[str, float]]:
        """Each of CHURN_RATES in turn, against lb (`pid`) in `ns`."""
        seconds = QUICK_CHURN_SECONDS if quick else CHURN_SECONDS
        out = {}
        metrics = await lb_metrics(ns)
        for rate in CHURN_RATES:
            out[rate], metrics = await measure_churn(
                ns, pid, self, rate, seconds=seconds, before=metrics
            )
        return out

    async def caught_up(self, ns: Netns) -> float | None:
        """Seconds until lb's admin API shows the last update (syncs apply the whole
        store, so every earlier one too); None past CHURN_DRAIN_TIMEOUT."""
        i, generation = (self.sent - 1) % self.n, 1 + (self.sent - 1) // self.n
        path = f"/api/v1/services/default%2Fs{i}%3Ahttp"
        start = time.monotonic()
        while time.monotonic() - start < CHURN_DRAIN_TIMEOUT:
            status, answer = await request(ns, "GET", path)
            if status == 200 and f'"{first_endpoint(i, generation)}:' in answer.decode():
                return time.monotonic() - start
            await asyncio.sleep(0.1)
        return None

    async def run(self, rate: float, seconds: float) -> int:
        """Updates at `rate` a second for `seconds`, on an absolute schedule (a late one
        does not push back the others): how many."""
        loop = asyncio.get_running_loop()
        total = max(1, round(rate * seconds))
        start = loop.time()
        for k in range(total):
            delay = start + k / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            i = self.sent % self.n
            generation = 1 + self.sent // self.n
            self.api.put(slice_of(i, generation, trigger_time()))
            self.sent += 1
        return total


async def measure_churn(
    ns: Netns, pid: int, churn: Churn, rate: float, *, seconds: float, before: str
) -> tuple[dict[str, float], str]:
    """`rate` updates a second for `seconds`, lb's /metrics text `before` them: lb's
    programming latency for them, and its /metrics text after."""
    cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
    sent = await churn.run(rate, seconds)
    cpu = 100 * (_cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
    caught_up = await churn.caught_up(ns)
    await asyncio.sleep(0.5)  # the sync that applied it observes its metrics after
    after = await lb_metrics(ns)
    seen = histogram(after, PROGRAMMING).minus(histogram(before, PROGRAMMING))
    syncs = histogram(after, SYNC).minus(histogram(before, SYNC))
    out = {"updates": float(sent), "applied": seen.count, "cpu_percent": cpu}
    if caught_up is not None:
        out["caught_up"] = caught_up
    if seen.count:
        for q in (50, 99):
            value, low, high = seen.quantile(q / 100)
            out |= {f"p{q}": value, f"p{q}_bucket_low": low, f"p{q}_bucket_high": high}
        out["mean"] = seen.sum / seen.count
    out["syncs"] = syncs.count
    if syncs.count:
        out["sync_mean"] = syncs.sum / syncs.count
    return out, after


def read_log(log: Path, launched: float) -> tuple[dict[str, float], list[str]]:
    """From lb's JSON log: the seconds from the command to each phase's event, and the
    messages of the syncs that failed."""
    out: dict[str, float] = {}
    failed: list[str] = []
    events = {event: phase for phase, event in PHASES.items()}
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        phase = events.get(str(record.get("event")))
        if phase is not None and phase not in out:
            when = datetime.datetime.fromisoformat(record["ts"]).timestamp()
            out[phase] = when - launched
        if record.get("event") == FAILED:
            failed.append(str(record.get("msg")))
    return out, failed


@dataclass
class LbResult:
    figures: dict[str, Summary]
    churn: dict[int, dict[str, float]]
    failures: list[str]  # the messages of the syncs that failed during the starts


async def measure_lb(
    api: FakeApiServer,
    dataplane: str,
    runs: int,
    *,
    quick: bool,
    churn: Churn | None,
) -> LbResult:
    """`runs` starts of lb on `dataplane` against the double; idle figures (and the churn,
    if given) after the last one."""
    values: dict[str, list[float]] = {"start": [], **{p: [] for p in PHASES}, "failed_syncs": []}
    churned: dict[int, dict[str, float]] = {}
    failures: list[str] = []
    async with namespace(f"lbbench-k8s-{dataplane}", dataplane) as ns:
        with inside(ns.name):
            sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        await api.start(sock=sock)
        try:
            with tempfile.TemporaryDirectory(prefix="lbbench-k8s-") as tmp:
                kubeconfig, cfg = Path(tmp) / "kubeconfig", Path(tmp) / "lb.yaml"
                api.write_kubeconfig(kubeconfig)
                cfg.write_text(LB_YAML)
                args = ["-c", str(cfg), "--dataplane", dataplane, "--source", "kubernetes"]
                args += ["--kubeconfig", str(kubeconfig), "--hostname-override", NODE]
                for r in range(runs):
                    log = Path(tmp) / f"lb-{r}.log"
                    with log.open("wb") as stderr:
                        launched = time.time()
                        async with lb_running(ns, args, stderr) as (proc, start):
                            values["start"].append(start)
                            if r == runs - 1:
                                idle_cpu, rss = await idle(proc.pid, quick)
                                if churn is not None:
                                    churned = await churn.measure(ns, proc.pid, quick)
                    phases, failed = read_log(log, launched)
                    for phase, seconds_in in phases.items():
                        values[phase].append(seconds_in)
                    values["failed_syncs"].append(len(failed))
                    failures += failed
        finally:
            await api.stop()
    figures = {name: Summary.of(v) for name, v in values.items() if v}
    figures["rss_mb"] = Summary.of([rss])
    figures["idle_cpu_percent"] = Summary.of([idle_cpu])
    return LbResult(figures, churned, sorted(set(failures)))


async def measure(
    sizes: list[int],
    runs: int,
    advance: Callable[[str], None] = lambda _: None,
    quick: bool = False,
) -> dict[str, Any]:
    """The part's results, as results.json holds them under `k8s`."""
    largest = max(sizes)
    seconds = QUICK_CHURN_SECONDS if quick else CHURN_SECONDS
    doc: dict[str, Any] = {
        "double": {},
        "lb": {dp: {} for dp in DATAPLANES},
        "churn": {"services": largest, "seconds": seconds, "rates": {}},
        "failures": {},
    }
    for n in sizes:
        doc["double"][str(n)] = as_dict(await measure_double(n, runs))
        advance(f"the API double alone, {n} services")
        api = populated(n)
        for dp in DATAPLANES:
            churn = Churn(api, n) if n == largest else None
            result = await measure_lb(api, dp, runs, quick=quick, churn=churn)
            doc["lb"][dp][str(n)] = as_dict(result.figures)
            if result.churn:
                doc["churn"]["rates"][dp] = {str(r): c for r, c in result.churn.items()}
            if result.failures:
                doc["failures"].setdefault(dp, {})[str(n)] = result.failures
            advance(f"lb run --source kubernetes, {dp}, {n} services")
    return doc


def as_dict(figures: dict[str, Summary]) -> dict[str, dict[str, float]]:
    return {name: s.as_dict() for name, s in figures.items()}
