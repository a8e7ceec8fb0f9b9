"""IPVS does the work of the change: an apply given `Changes` reads and writes only the
services it names, whatever the number of services; a periodic resync repairs drift."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import replace

import pytest

from lb.changes import Changes
from lb.model import Backend, Endpoint, IPAddress, Protocol, SchedulerName, Service, ServiceKey
from offload.host import nat_paths
from offload.ipvs import RESYNC_DUTY, RESYNC_PERIOD, STIRRED, IpvsDataplane
from offload.ipvs_model import KDest, KService
from offload.nft_rules import NatPath
from tests.support.fake_ipvs import FakeIpvs


class CountingIpvs(FakeIpvs):
    """The in-memory kernel, counting reads: a dump of services, a dump of one service's
    destinations, and the reads of lb's device."""

    def __init__(self) -> None:
        super().__init__()
        self.service_dumps = 0
        self.dest_dumps = 0

    async def services(self) -> list[KService]:
        self.service_dumps += 1
        return await super().services()

    async def dests(self, key: ServiceKey) -> list[KDest]:
        self.dest_dumps += 1
        return await super().dests(key)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fleet(n: int) -> list[Service]:
    """n services on n VIPs of 10.1.0.0/16, 10 backends each."""
    out = []
    for i in range(n):
        vip = ipaddress.ip_address(0x0A010000 + i)
        backends = tuple(
            Backend(Endpoint(ipaddress.ip_address(0x0A020000 + i * 16 + j), 8080))
            for j in range(10)
        )
        out.append(
            Service(
                name=f"s{i}",
                protocol=Protocol.TCP,
                listen=Endpoint(vip, 80),
                scheduler=SchedulerName.RR,
                backends=backends,
                retries=0,
            )
        )
    return out


class Setup:
    def __init__(self, n: int) -> None:
        self.fake = CountingIpvs()
        self.clock = Clock()
        self.services = fleet(n)
        self.vips: set[IPAddress] = {s.listen.ip for s in self.services}
        self.vip_reads = 0

        async def vips() -> set[IPAddress]:
            self.vip_reads += 1
            return set(self.vips)

        self.dp = IpvsDataplane(self.fake, vips, clock=self.clock, hold=self.fake.hold)

    def counts(self) -> tuple[int, int, int, int]:
        f = self.fake
        return (f.service_dumps, f.dest_dumps, f.writes, self.vip_reads)


def weight_edit(s: Service, j: int, weight: int) -> Service:
    backends = list(s.backends)
    backends[j] = replace(backends[j], weight=weight)
    return replace(s, backends=tuple(backends))


@pytest.mark.parametrize("n", [10, 1000])
async def test_one_weight_edit_reads_and_writes_the_same_at_any_size(n: int) -> None:
    t = Setup(n)
    await t.dp.apply(t.services, Changes(t.services))  # the first apply reconciles everything
    assert t.fake.service_dumps >= 1
    before = t.counts()
    edited = weight_edit(t.services[n // 2], 3, 7)
    desired = [*t.services[: n // 2], edited, *t.services[n // 2 + 1 :]]
    await t.dp.apply(desired, Changes([edited], []))
    after = t.counts()
    # no dump of the service table; the edited service's destinations read before the
    # write (their connections decide delete or quiesce) and after it; one write
    assert tuple(a - b for a, b in zip(after, before, strict=True)) == (0, 2, 1, 0)
    assert t.fake.log[-1] == f"set-dest {edited.backends[3].address} w7"
    assert {d.endpoint: d.weight for d in t.fake.lists[edited.key]}[edited.backends[3].address] == 7


async def test_adds_and_removals_through_changes() -> None:
    t = Setup(20)
    await t.dp.apply(t.services, Changes(t.services))
    new = fleet(21)[20]
    t.vips.add(new.listen.ip)
    before = t.counts()
    await t.dp.apply([*t.services, new], Changes([new], []))
    dumps, dest_dumps, writes, vip_reads = (a - b for a, b in zip(t.counts(), before, strict=True))
    assert (dumps, dest_dumps, writes, vip_reads) == (0, 1, 11, 1)  # a new VIP: device read once
    assert new.key in t.fake.svcs and len(t.fake.lists[new.key]) == 10
    gone = t.services[0]
    before = t.counts()
    await t.dp.apply([*t.services[1:], new], Changes([], [gone.key]))
    assert tuple(a - b for a, b in zip(t.counts(), before, strict=True)) == (0, 0, 1, 0)
    assert gone.key not in t.fake.svcs
    assert t.dp.observe(gone.key) == []


async def test_a_surprise_falls_back_to_a_full_reconcile() -> None:
    """A service that exists already (made behind lb's back on its VIP): adopted."""
    t = Setup(3)
    await t.dp.apply(t.services, Changes(t.services))
    new = fleet(4)[3]
    t.vips.add(new.listen.ip)
    await t.fake.add_service(KService(new.key, "wlc"))
    before = t.fake.service_dumps
    await t.dp.apply([*t.services, new], Changes([new], []))
    assert t.fake.service_dumps == before + 1 + 1  # the reconcile's dump, its refresh's
    assert t.fake.svcs[new.key].scheduler == "rr" and len(t.fake.lists[new.key]) == 10


async def test_a_failed_apply_makes_the_next_one_reconcile() -> None:
    t = Setup(3)
    await t.dp.apply(t.services, Changes(t.services))
    edited = weight_edit(t.services[1], 0, 5)

    async def broken(key: ServiceKey, dest: KDest) -> None:
        raise OSError("netlink went away")

    real = t.fake.set_dest
    t.fake.set_dest = broken  # type: ignore[method-assign]
    with pytest.raises(OSError):  # the fallback reconcile fails the same way
        await t.dp.apply([t.services[0], edited, t.services[2]], Changes([edited], []))
    t.fake.set_dest = real  # type: ignore[method-assign]
    before = t.fake.service_dumps
    again = weight_edit(t.services[2], 0, 4)
    await t.dp.apply([t.services[0], edited, again], Changes([again], []))
    assert t.fake.service_dumps > before  # looked at everything, so the first edit is in too
    weights = {k: {d.endpoint: d.weight for d in v} for k, v in t.fake.lists.items()}
    assert weights[edited.key][edited.backends[0].address] == 5
    assert weights[again.key][again.backends[0].address] == 4


async def test_drift_is_repaired_by_the_periodic_resync(caplog: pytest.LogCaptureFixture) -> None:
    t = Setup(5)
    await t.dp.apply(t.services, Changes(t.services))
    victim = t.services[2]
    await t.fake.del_service(victim.key)  # someone ran ipvsadm -D
    t.clock.now = RESYNC_PERIOD / 2
    await t.dp.refresh()
    assert victim.key not in t.fake.svcs  # counters are read, the table is not reconciled
    t.clock.now = RESYNC_PERIOD + 1
    with caplog.at_level(logging.WARNING, logger="lb.offload"):
        await t.dp.refresh()
    assert victim.key in t.fake.svcs and len(t.fake.lists[victim.key]) == 10
    (event,) = [r.getMessage() for r in caplog.records if "IPVS no longer had" in r.getMessage()]
    assert f"{victim.key} missing" in event
    caplog.clear()
    t.clock.now = 2 * RESYNC_PERIOD + 2
    with caplog.at_level(logging.WARNING, logger="lb.offload"):
        await t.dp.refresh()  # nothing drifted: nothing said, nothing written
    assert not [r for r in caplog.records if "IPVS no longer had" in r.getMessage()]


async def test_a_refresh_reads_the_destinations_only_of_services_that_moved() -> None:
    """Counters: one dump of the services, then the destinations of those whose counters
    moved within STIRRED (their entries still expire with no packet); an idle service
    costs nothing past the first dump."""
    t = Setup(100)
    await t.dp.apply(t.services, Changes(t.services))
    t.dp.resync_every = 1e9  # counters only: no periodic resync in this test
    t.clock.now = 1.0
    await t.dp.refresh()
    t.clock.now = STIRRED + 2
    before = t.counts()
    await t.dp.refresh()
    assert tuple(a - b for a, b in zip(t.counts(), before, strict=True)) == (1, 0, 0, 0)
    busy = t.services[7].key
    t.fake.set_conns(busy, t.services[7].backends[0].address, 1)  # its counters move
    t.clock.now = STIRRED + 3
    before = t.counts()
    await t.dp.refresh()
    assert tuple(a - b for a, b in zip(t.counts(), before, strict=True)) == (1, 1, 0, 0)
    (snap,) = t.dp.observe(only=busy)
    assert sum(b.active for b in snap.backends) == 1
    # the connection closed, and its entry goes from active to inactive with no packet
    t.fake.lists[busy] = [replace(d, active=0, inactive=d.active) for d in t.fake.lists[busy]]
    t.clock.now = STIRRED + 4
    await t.dp.refresh()  # still read: its counters moved a second ago
    (snap,) = t.dp.observe(only=busy)
    assert [sum(b.active for b in snap.backends), sum(b.inactive for b in snap.backends)] == [
        0,
        1,
    ]
    t.clock.now = 2 * STIRRED + 10
    before = t.counts()
    await t.dp.refresh()
    assert tuple(a - b for a, b in zip(t.counts(), before, strict=True)) == (1, 0, 0, 0)


async def test_the_resync_period_grows_with_what_a_resync_costs() -> None:
    """A resync dumps every service's destinations: when that takes long (a slow kernel,
    many services), the next waits RESYNC_DUTY times as long, so an idle lb stays idle."""
    t = Setup(10)
    await t.dp.apply(t.services, Changes(t.services))
    read = t.fake.dests

    async def slow(key: ServiceKey) -> list[KDest]:
        t.clock.now += 0.05  # 10 services: half a second a resync
        return await read(key)

    t.fake.dests = slow  # type: ignore[method-assign]
    t.clock.now = RESYNC_PERIOD + 1
    before = t.fake.service_dumps
    await t.dp.refresh()
    assert t.fake.service_dumps > before  # the resync ran
    assert t.dp.resync_every == pytest.approx(RESYNC_DUTY * 0.5)  # each read once
    t.clock.now += RESYNC_PERIOD + 1
    resynced = t.fake.dest_dumps
    await t.dp.refresh()  # 30 s later: counters only (no service moved: no destinations)
    assert t.fake.dest_dumps == resynced


async def test_masquerade_paths_are_rewritten_only_when_they_change() -> None:
    """The host's masquerade table is rebuilt whole: a weight edit must not touch it; a
    service that comes or goes does, with exactly the paths still needed."""
    t = Setup(3)
    calls: list[set[NatPath]] = []

    async def nat(paths: set[NatPath]) -> None:
        calls.append(set(paths))

    t.dp.nat = nat
    await t.dp.apply(t.services, Changes(t.services))
    assert calls == [nat_paths(t.services)]
    edited = weight_edit(t.services[1], 0, 9)
    await t.dp.apply([t.services[0], edited, t.services[2]], Changes([edited], []))
    assert len(calls) == 1  # same paths: nothing rewritten
    new = fleet(4)[3]
    t.vips.add(new.listen.ip)
    await t.dp.apply([t.services[0], edited, t.services[2], new], Changes([new], []))
    assert calls[-1] == nat_paths([t.services[0], edited, t.services[2], new])
    await t.dp.apply([edited, t.services[2], new], Changes([], [t.services[0].key]))
    assert calls[-1] == nat_paths([edited, t.services[2], new])
    assert len(calls) == 3
