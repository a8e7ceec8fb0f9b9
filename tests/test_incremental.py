"""Work is that of the change, not of the number of services: an edit remakes one service
and every other stays the very object the dataplanes applied (which they recognise by
identity), idle services are not visited by housekeeping or rate sampling, and rates
computed from the active services alone are the kernel estimator's."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from lb.changes import Changes
from lb.config import parse_config
from lb.controller import Controller
from lb.model import Backend, Endpoint, Mode, Protocol, SchedulerName, Service, ServiceKey
from lb.persist import Affinity
from lb.proxy.dataplane import UserspaceDataplane
from lb.rates import INTERVAL, RateEstimator
from lb.stats import ErrorReason, ServiceSnapshot, Totals
from offload.manager import OffloadManager
from offload.policy import OffloadPolicy
from tests.support.doubles import RecordingDataplane
from tests.support.net import TcpBackend, eventually, free_port, read_line


def services_config(ports: list[int], backend: str) -> str:
    return "services:\n" + "".join(
        f"  - {{name: s{i}, listen: '127.0.0.1:{p}', scheduler: rr,"
        f" backends: [{{address: '{backend}'}}]}}\n"
        for i, p in enumerate(ports)
    )


async def test_an_edit_remakes_one_service_and_the_others_stay_the_same_objects() -> None:
    text = services_config([8001, 8002, 8003], "127.0.0.1:9000")
    dp = RecordingDataplane()
    c = Controller(dp)
    await c.start(parse_config(text))
    first = dp.applied[-1]
    await c.edit_backend("s1", "127.0.0.1:9000", weight=5)
    second = dp.applied[-1]
    assert [s.name for s in second] == ["s0", "s1", "s2"]
    assert second[0] is first[0] and second[2] is first[2]
    assert second[1] is not first[1] and second[1].backends[0].weight == 5
    assert dp.changes[-1] == Changes([second[1]], [])  # and it says so
    # the same file read again: new objects, equal ones, so the dataplanes get the old ones
    await c.reload(parse_config(text))
    third = dp.applied[-1]
    assert third[0] is first[0] and third[1] is second[1] and third[2] is first[2]
    # a changed file: only what changed is new
    await c.reload(parse_config(text.replace("8003", "8004")))
    fourth = dp.applied[-1]
    assert fourth[0] is first[0] and fourth[1] is second[1]
    assert fourth[2].listen.port == 8004
    assert dp.changes[-1] == Changes([fourth[2]], [first[2].key])
    await c.shutdown(0)


async def test_a_failed_apply_leaves_the_edit_to_be_made_again() -> None:
    text = services_config([8001, 8002], "127.0.0.1:9000")
    dp = RecordingDataplane()
    c = Controller(dp)
    await c.start(parse_config(text))
    fail = True

    async def flaky(desired: list[Service], changes: Changes) -> None:
        if fail:
            raise OSError("the dataplane said no")
        dp.applied.append(list(desired))

    dp.apply = flaky  # type: ignore[method-assign]
    try:
        await c.edit_backend("s0", "127.0.0.1:9000", weight=7)
    except OSError:
        pass
    fail = False
    await c.edit_backend("s1", "127.0.0.1:9000", weight=3)
    s0, s1 = dp.applied[-1]
    assert s0.backends[0].weight == 1  # the failed edit was rolled back, not lost half-way
    assert s1.backends[0].weight == 3
    await c.shutdown(0)


def test_changes_between_two_lists_are_by_key_and_value() -> None:
    def svc(i: int) -> Service:
        return Service(
            f"s{i}",
            Protocol.TCP,
            Endpoint.parse(f"10.0.0.{i}:80"),
            SchedulerName.RR,
            backends=(Backend(Endpoint.parse("10.1.0.1:80")),),
        )

    ss = [svc(i) for i in range(1, 6)]
    assert Changes.between([], ss) == Changes(ss, [])
    assert Changes.between(ss, [svc(i) for i in range(1, 6)]) == Changes()  # equal values
    edited = dataclasses.replace(ss[2], scheduler=SchedulerName.WRR)
    later = [*ss[:2], edited, *ss[3:4]]
    assert Changes.between(ss, later) == Changes([edited], [ss[4].key])
    assert not Changes.between(later, later)


async def test_idle_services_are_not_visited_and_a_busy_one_is() -> None:
    backend = await TcpBackend("A").start()
    ports = [free_port() for _ in range(20)]
    dp = UserspaceDataplane()
    c = Controller(dp)
    await c.start(parse_config(services_config(ports, backend.address)))
    try:
        baselines = dp.active()  # each new service: the baseline of its rates, which for
        assert len(baselines) == 20  # a service that counted nothing needs no backend
        assert all(not b.backends and b.totals.conns == 0 for b in baselines)
        assert dp.active() == []  # counters that did not move are not sampled again
        await eventually(lambda: not dp._due, timeout=5)  # housekeeping found them idle
        assert dp.active() == []  # and from then on, nothing
        assert await read_line("127.0.0.1", ports[7]) == "A"
        [busy] = dp.active()
        assert busy.service.name == "s7" and busy.totals.conns == 1
        assert [b.totals.conns for b in busy.backends] == [1]  # moved: with its backends'
        assert dp.active() == []
        assert dp._due == {dp.runtime("s7")}  # its closed connection lingers (TIME_WAIT)
    finally:
        await c.shutdown(0)
        await backend.stop()


class FakeKernel:
    """A kernel dataplane that keeps what it is given (the real ones are tested against
    the kernel: tests/test_nft_offload.py, tests/kernel/)."""

    name = "fake"
    carries_affinity = False

    def __init__(self, lingers: bool = False) -> None:
        self.lingers = lingers
        self.foreign: set[ServiceKey] = set()
        self.applied: list[list[Service]] = []
        self.told: list[Changes] = []
        self.checked: list[str] = []
        self.busy: set[ServiceKey] = set()  # keys whose connections are not drained

    def not_expressible(self, s: Service) -> str | None:
        self.checked.append(s.name)
        return None

    async def apply(
        self,
        desired: list[Service],
        changes: Changes,
        seeds: Mapping[ServiceKey, list[Affinity]] | None = None,
    ) -> None:
        self.applied.append(list(desired))
        self.told.append(changes)

    async def export_affinity(self, key: ServiceKey) -> list[Affinity]:
        return []

    async def refresh(self) -> None:
        pass

    async def owned(self) -> set[ServiceKey]:
        return {s.key for s in self.applied[-1]} if self.applied else set()

    def has(self, key: ServiceKey) -> bool:
        return bool(self.applied) and key in {s.key for s in self.applied[-1]}

    def drained(self, key: ServiceKey, keep: Endpoint | None = None) -> bool:
        return key not in self.busy

    def observe(self, only: ServiceKey | None = None) -> list[ServiceSnapshot]:
        return []

    def active(self) -> list[ServiceSnapshot]:
        return []

    async def remove_all(self) -> None:
        pass

    def fastpath_note(self) -> str:
        return "no fast path"


async def test_offload_manager_reconsiders_only_what_changed() -> None:
    """In nftables/IPVS mode the manager asks the kernel dataplane about the changed
    service only, and hands it the other services as the objects it had."""
    kernel = FakeKernel()
    checked = kernel.checked
    manager = OffloadManager(UserspaceDataplane())
    manager.enable(OffloadPolicy(Mode.NFTABLES, 10, 3), kernel, None, 1.0)
    c = Controller(manager)
    ports = [free_port() for _ in range(10)]
    await c.start(parse_config(services_config(ports, "127.0.0.1:9000")))
    try:
        assert sorted(checked) == sorted(f"s{i}" for i in range(10))
        first = kernel.applied[-1]
        checked.clear()
        await c.edit_backend("s4", "127.0.0.1:9000", weight=2)
        assert checked == ["s4"]
        second = kernel.applied[-1]
        assert len(kernel.applied) == 2
        assert [s for s in second if s.name != "s4"] == [s for s in first if s.name != "s4"]
        assert all(
            a is b for a, b in zip(first, second, strict=True) if a.name != "s4"
        )  # the very objects: the kernel dataplane sees no change there
        [s4] = [s for s in second if s.name == "s4"]
        assert kernel.told[-1] == Changes([s4], [])  # and is told which one changed
        await asyncio.sleep(1.5)  # a tick of the manager: nothing due, nothing applied
        assert len(kernel.applied) == 2 and checked == ["s4"]
    finally:
        await c.shutdown(0)


async def test_a_demoted_service_comes_back_once_calm() -> None:
    """auto with a kernel that lingers (IPVS): churn demotes, the service lingers in the
    kernel while its connections drain, and once drained and calm it is promoted again,
    although its wait for calm ended while it was still draining."""
    kernel = FakeKernel(lingers=True)
    manager = OffloadManager(UserspaceDataplane())
    manager.enable(OffloadPolicy(Mode.AUTO, 1.0, 3), kernel, None, 60.0)
    c = Controller(manager)
    port = free_port()
    text = services_config([port], "127.0.0.1:9000")
    await c.start(parse_config(text))
    [s0] = c.desired()
    try:
        await eventually(lambda: manager.explain(s0.key).placement == "kernel", timeout=5)
        kernel.busy.add(s0.key)  # a connection through the kernel that goes on
        for w in (2, 3, 4):  # churn: 3 changes within hold_down
            await c.edit_backend("s0", "127.0.0.1:9000", weight=w)
        assert manager.explain(s0.key).placement == "demoting"
        await asyncio.sleep(2.5)  # calm for longer than hold_down: its timer has fired
        assert manager.explain(s0.key).placement == "demoting"  # still draining
        kernel.busy.clear()
        await eventually(lambda: manager.explain(s0.key).placement == "kernel", timeout=5)
    finally:
        await c.shutdown(0)


async def test_a_persistent_service_waits_for_its_templates_before_ipvs_takes_it() -> None:
    """A kernel that cannot take userspace's templates (IPVS): the promote waits while a
    client's template lives, at most affinity_wait, then goes ahead and says so."""
    backend = await TcpBackend("A").start()
    kernel = FakeKernel(lingers=True)
    manager = OffloadManager(UserspaceDataplane())
    manager.enable(OffloadPolicy(Mode.AUTO, 1.0, 3), kernel, None, 60.0, affinity_wait=2.0)
    c = Controller(manager)
    port = free_port()
    text = services_config([port], backend.address).replace(
        "scheduler: rr,", "scheduler: rr, persistence: {timeout: 300},"
    )
    await c.start(parse_config(text))
    [s0] = c.desired()
    try:
        assert await read_line("127.0.0.1", port) == "A"  # a template for 127.0.0.1
        await asyncio.sleep(1.5)  # calm past hold_down
        offload = manager.explain(s0.key)
        assert offload.placement == "userspace", offload
        assert "waits in userspace until its persistence templates expire" in offload.reason
        await eventually(lambda: manager.explain(s0.key).placement == "kernel", timeout=5)
        assert "schedules their clients afresh" in manager.explain(s0.key).reason
    finally:
        await c.shutdown(0)
        await backend.stop()


# --- rates -------------------------------------------------------------------------------


def _totals(conns: int, nbytes: int) -> Totals:
    return Totals(
        conns=conns,
        bytes_in=nbytes,
        bytes_out=nbytes // 2,
        packets_in=0,
        packets_out=0,
        errors=dict.fromkeys(ErrorReason, 0),
    )


def _snap(name: str, conns: int, nbytes: int) -> ServiceSnapshot:
    s = Service(name, Protocol.TCP, Endpoint.parse(f"10.0.0.{name[1:]}:80"), SchedulerName.RR)
    return ServiceSnapshot(s, "userspace", True, 0, _totals(conns, nbytes), ())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 3), st.integers(1, 50)), max_size=4),
        min_size=1,
        max_size=30,
    )
)
def test_sampling_only_active_services_gives_the_kernel_estimators_rates(
    rounds: list[list[tuple[int, int]]],
) -> None:
    """Each round, some services get new connections; the estimator fed only those (and
    every service in the first round, as a new runtime is) must read exactly as the
    kernel's, which samples every service every 2 s."""
    names = [f"s{i}" for i in range(1, 5)]
    conns = dict.fromkeys(names, 0)
    lazy = RateEstimator()
    lazy.round(0.0, [_snap(n, 0, 0) for n in names])
    expected = dict.fromkeys(names, 0.0)  # the kernel's smoothed cps
    for r, events in enumerate(rounds, start=1):
        before = dict(conns)
        moved = set()
        for i, k in events:
            conns[names[i]] += k
            moved.add(names[i])
        now = r * INTERVAL
        for n in names:  # ip_vs_est.c, for every service
            expected[n] += ((conns[n] - before[n]) / INTERVAL - expected[n]) / 4
        lazy.round(now, [_snap(n, conns[n], 10 * conns[n]) for n in sorted(moved)])
        for n in names:
            key = _snap(n, 0, 0).service.key
            got = lazy.service(key, "userspace").cps
            assert abs(got - expected[n]) < 1e-9 * max(1.0, expected[n]), (r, n, got, expected[n])


def test_rates_of_services_a_dataplane_no_longer_has_are_forgotten() -> None:
    est = RateEstimator()
    a, b = _snap("s1", 0, 0), _snap("s2", 0, 0)
    est.round(0.0, [a, b])
    est.round(2.0, [_snap("s1", 4, 0), _snap("s2", 8, 0)])
    assert est.service(b.service.key, "userspace").cps == 1.0  # (8 / 2 s) / 4
    est.prune(lambda key, dataplane: key == a.service.key)
    assert est.service(b.service.key, "userspace").cps == 0.0
    assert est.service(a.service.key, "userspace").cps == 0.5


async def test_an_idle_nftables_dataplane_does_not_read_conntrack() -> None:
    """Every new flow moves a counter of lb's: with no flow known and no counter moved,
    a refresh leaves conntrack alone (an idle lb spawns no `conntrack -L` each second)."""
    from offload.conntrack import Conntrack, Flow
    from offload.nft_rules import TABLE
    from offload.nftables import NftDataplane

    class FakeConntrack(Conntrack):
        def __init__(self) -> None:
            self.reads = 0
            self.table: list[Flow] = []

        async def flows(self) -> list[Flow]:
            self.reads += 1
            return list(self.table)

    counters: dict[str, tuple[int, int]] = {}

    async def nft(script: str) -> str:
        return ""

    async def query(*args: str) -> dict[str, object]:
        return {
            "nftables": [
                {"counter": {"family": "ip", "table": TABLE, "name": n, "packets": p, "bytes": b}}
                for n, (p, b) in counters.items()
            ]
        }

    ct = FakeConntrack()
    dp = NftDataplane(nft=nft, query=query, conntrack=ct)
    (s,) = parse_config(services_config([8001], "127.0.0.2:9000")).services
    await dp.apply([s], Changes([s]))
    names = [c.counter for c in (dp._rendered or {})[s.key].counters]
    counters.update(dict.fromkeys(names, (0, 0)))
    await dp.refresh()
    assert ct.reads == 1  # the first refresh reads: flows may predate this run
    await dp.refresh()
    assert ct.reads == 1  # idle: nothing new, nothing known
    counters[names[0]] = (1, 60)  # a new flow
    ct.table = [Flow(s.key, s.backends[0].address, True)]
    await dp.refresh()
    assert ct.reads == 2 and dp.observe()[0].backends[0].active == 1
    await dp.refresh()
    assert ct.reads == 3  # a flow is known: read until it is gone
    ct.table = []
    await dp.refresh()
    await dp.refresh()
    assert ct.reads == 4 and dp.observe()[0].backends[0].active == 0


def test_the_estimator_keeps_nothing_of_what_counted_nothing() -> None:
    """A baseline of zeros costs no memory per part (100,000 idle backends at 10,000
    services), and counting from it is counting from zero."""
    est = RateEstimator()
    idle = _snap("s1", 0, 0)
    est.round(0.0, [idle])
    [entry] = est._entries.values()
    assert entry.marks == {}
    est.round(2.0, [_snap("s1", 8, 0)])
    assert est.service(idle.service.key, "userspace").cps == 1.0  # (8 / 2 s) / 4


def test_counters_that_went_back_are_counted_from_zero() -> None:
    """A service that left a dataplane and came back between two prunes shows the new
    counters' rate, never a negative one."""
    est = RateEstimator()
    est.round(0.0, [_snap("s1", 0, 0)])
    est.round(2.0, [_snap("s1", 100, 0)])
    est.round(4.0, [_snap("s1", 8, 0)])  # back in a dataplane whose counters began at 0
    cps = est.service(_snap("s1", 0, 0).service.key, "userspace").cps
    assert cps == 12.5 + (8 / 2 - 12.5) / 4  # from (100 / 2) / 4, moved by 8 in 2 s
