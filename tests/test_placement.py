"""The placement core (offload/placement.py): its invariants over random sequences of
edits, health changes, reloads, removals, ticks, connections, kernel refreshes, failed
applies and foreign services, driven through a model of the kernel. No sleeps: time is
a number the test moves."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.model import Backend, Endpoint, Mode, Protocol, SchedulerName, Service, ServiceKey
from lb.stats import Placement
from offload.placement import Actions, InvariantError, Move, Placements
from offload.policy import OffloadPolicy

HOLD_DOWN = 10.0
CHURN_LIMIT = 3
DRAIN_TIMEOUT = 30.0
KEYS = 4
ELSEWHERE = 3  # the VIP of this service is on another device of the host: never offloaded


def service(i: int, weight: int = 1, healthy: bool = True, retries: int = 0) -> Service:
    backends = (
        Backend(Endpoint.parse("10.0.1.1:8080"), weight),
        Backend(Endpoint.parse("10.0.1.2:8080"), 1, healthy=healthy),
    )
    listen = Endpoint.parse(f"10.0.0.{i + 1}:80")
    return Service(
        f"s{i}", Protocol.TCP, listen, SchedulerName.RR, backends=backends, retries=retries
    )


def key(i: int) -> ServiceKey:
    return service(i).key


def takes_nat(form: Service) -> bool:
    """The kernel gives the form's new connections to a NAT destination."""
    return any(b.address != form.listen and b.effective_weight > 0 for b in form.backends)


def hands_back(form: Service) -> bool:
    """The form sends new connections to the userspace listener (a local destination)."""
    return any(b.address == form.listen and b.effective_weight > 0 for b in form.backends)


@dataclass
class World:
    """The kernel as the executor sees it, and what the test checks against."""

    core: Placements
    lingers: bool
    has_kernel: bool
    now: float = 0.0
    desired: dict[ServiceKey, Service] = field(default_factory=dict)
    kernel: dict[ServiceKey, Service] = field(default_factory=dict)  # what it carries
    conns: dict[ServiceKey, int] = field(default_factory=dict)  # NAT connections in it
    seen: dict[ServiceKey, int] = field(default_factory=dict)  # conns by the last refresh
    observed: float | None = None
    foreign: set[ServiceKey] = field(default_factory=set)
    fail_next = False
    in_sync = True  # the last write went through
    may_cut: set[ServiceKey] = field(default_factory=set)  # drain timed out
    last_change: dict[ServiceKey, float] = field(default_factory=dict)
    written: dict[ServiceKey, list[tuple[float, Service]]] = field(default_factory=dict)
    promotes: dict[ServiceKey, list[float]] = field(default_factory=dict)
    timers_from: float = 0.0  # the last step that looked at timers
    forced: set[ServiceKey] = field(default_factory=set)  # moved by the host (foreign)

    # --- the executor ------------------------------------------------------------------

    def drained(self) -> set[ServiceKey]:
        return {
            k
            for k, keep in self.core.draining().items()
            if (keep is not None or k in self.kernel) and self.seen.get(k, 0) == 0
        }

    def step(self, actions: Actions, expected: set[ServiceKey]) -> None:
        assert actions.visited <= expected, (
            f"visited idle keys: {actions.visited - expected} at {self.now}"
        )
        self.execute(actions)

    def execute(self, actions: Actions) -> None:
        for _ in range(2):
            for m in actions.moves:
                if m.move is Move.PROMOTE:
                    self.promotes.setdefault(m.key, []).append(self.now)
                    self.may_cut.discard(m.key)
            w = actions.kernel
            if w is None:
                return
            assert self.has_kernel
            if self.fail_next:  # half of it went through
                self.fail_next = False
                fresh = w.changes.fresh[: len(w.changes.fresh) // 2]
                removed = w.changes.removed[: len(w.changes.removed) // 2]
                self.write(fresh, removed)
                self.core.apply_failed()
                self.in_sync = False
                return
            if self.in_sync:
                self.write(w.changes.fresh, w.changes.removed)
            else:  # after a failure the kernel dataplane reconciles everything
                forms = {f.key: f for f in w.forms}
                self.write(list(forms.values()), [k for k in self.kernel if k not in forms])
            assert self.kernel == {f.key: f for f in w.forms}, "the changes missed something"
            self.in_sync = True
            flipped = self.foreign.symmetric_difference(self.core.foreign)
            actions = self.core.applied(self.now, self.foreign)
            assert actions.visited <= flipped, "applied() looked beyond the keys it flipped"

    def write(self, fresh: list[Service], removed: list[ServiceKey]) -> None:
        for f in fresh:
            old = self.kernel.get(f.key)
            self.kernel[f.key] = f
            if f is self.desired.get(f.key) and old != f:
                self.written.setdefault(f.key, []).append((self.now, f))
        for k in removed:
            if k not in self.kernel:
                continue
            del self.kernel[k]
            cut = self.conns.pop(k, 0)
            if self.lingers and cut:
                assert k in self.may_cut, f"{k}: deleted with {cut} connections at {self.now}"
            self.may_cut.discard(k)

    # --- events ------------------------------------------------------------------------

    def due(self) -> set[ServiceKey]:
        if self.core.policy.mode is not Mode.AUTO:
            return set()
        return {
            k
            for k, t in self.last_change.items()
            if k in self.desired and self.timers_from < t + HOLD_DOWN <= self.now
        }

    def expected(self, touched: set[ServiceKey]) -> set[ServiceKey]:
        out = touched | self.due() | set(self.core.draining())
        self.timers_from = self.now
        return out

    def before_step(self) -> None:
        for k in self.core.draining():
            r = self.core.record(k)
            assert r is not None and r.drain_started is not None
            if r.placement is Placement.DEMOTING and r.drain_started + DRAIN_TIMEOUT <= self.now:
                self.may_cut.add(k)

    def edit(self, s: Service | None, k: ServiceKey) -> None:
        if s is None:
            if k not in self.desired:
                return
            del self.desired[k]
            self.last_change.pop(k, None)
            changed, removed = [], [k]
        else:
            old = self.desired.get(k)
            if old is None or old != s:
                self.last_change[k] = self.now
            self.desired[k] = s
            changed, removed = [s], []
        self.core.claim([s] if s is not None and self.core.record(k) is None else [])
        self.before_step()
        expected = self.expected({k})
        self.step(
            self.core.edit(changed, removed, self.now, self.drained(), self.observed), expected
        )

    def tick(self, dt: float) -> None:
        self.now += dt
        self.before_step()
        expected = self.expected(set())
        self.step(self.core.tick(self.now, self.drained(), self.observed), expected)

    def connect(self, k: ServiceKey) -> None:
        form = self.kernel.get(k)
        if form is not None and takes_nat(form):
            self.conns[k] = self.conns.get(k, 0) + 1

    def finish(self, k: ServiceKey) -> None:
        if self.conns.get(k):
            self.conns[k] -= 1

    def refresh(self) -> None:
        self.seen = dict(self.conns)
        self.observed = self.now

    # --- the checks --------------------------------------------------------------------

    def check(self) -> None:
        self.core.check_invariants()
        for form in self.kernel.values():
            # never two paths: a form that hands new connections back takes none itself
            assert not (takes_nat(form) and hands_back(form)), form
        if self.in_sync:
            for k in set(self.desired) | set(self.kernel):
                has = self.kernel.get(k)
                kernel_path = has is not None and not hands_back(has)
                placed = self.core.placement(k)
                if k in self.desired:  # the core knows which path takes them
                    assert kernel_path == (placed is Placement.KERNEL), (k, placed, has)
                else:
                    assert placed is Placement.USERSPACE and (has is None or not takes_nat(has))
        assert self.core.placement(key(ELSEWHERE)) is not Placement.KERNEL
        if self.core.policy.mode is Mode.AUTO:
            # churn, of the service's own changes (the host's moves are not bounded: a
            # VIP:port another program takes is given up at once, and taken back at once)
            for k, writes in self.written.items():
                if k in self.forced:
                    continue
                times = [t for t, _ in writes]
                for t in times:
                    n = sum(1 for u in times if t - HOLD_DOWN < u <= t)
                    assert n <= CHURN_LIMIT, f"{k}: {n} writes within {HOLD_DOWN}s: {times}"
            for k, ps in self.promotes.items():
                if k in self.forced:
                    continue
                for a, b in itertools.pairwise(ps):
                    assert b - a >= HOLD_DOWN, f"{k}: promoted at {a} and {b}"

    def settle(self) -> None:
        """No failures, no connections, time passes: every drain ends, and the kernel
        carries what the policy wants."""
        self.fail_next = False
        self.conns.clear()
        for _ in range(int((DRAIN_TIMEOUT + HOLD_DOWN) / 2) + 4):
            self.tick(2.0)
            self.refresh()
            self.check()
        assert not self.core.draining()
        assert self.in_sync
        for k, s in self.desired.items():
            want = self.has_kernel and self.core.policy.mode is not Mode.USERSPACE
            want = want and s.retries == 0 and k != key(ELSEWHERE) and k not in self.core.foreign
            want = want and self.core.policy.unavailable is None
            assert (self.core.placement(k) is Placement.KERNEL) == want, (k, self.core.explain(k))
        assert set(self.kernel) == {
            k for k in self.desired if self.core.placement(k) is Placement.KERNEL
        }
        assert set(self.core.needed_vips()) <= {k.listen.ip for k in self.desired} | {
            k.listen.ip for k in self.kernel
        }


MODES = [
    (Mode.AUTO, True),  # IPVS: demotions drain
    (Mode.AUTO, False),  # nftables: conntrack keeps established flows
    (Mode.IPVS, True),
    (Mode.NFTABLES, False),
    (Mode.USERSPACE, False),
]

keys_ = st.integers(0, KEYS - 1)
events = st.lists(
    st.tuples(
        st.one_of(
            st.tuples(st.just("edit"), keys_, st.integers(1, 3)),  # a weight edit
            st.tuples(st.just("burst"), keys_, st.integers(2, 5)),  # edits a second apart
            st.tuples(st.just("health"), keys_, st.integers(0, 1)),  # a backend DOWN / UP
            st.tuples(st.just("retries"), keys_, st.integers(0, 1)),  # expressible or not
            st.tuples(st.just("reload"), keys_, st.just(0)),  # an equal new object
            st.tuples(st.just("remove"), keys_, st.just(0)),
            st.tuples(st.just("tick"), st.sampled_from([1, 2, 5, 11, 31]), st.just(0)),
            st.tuples(st.just("refresh"), st.just(0), st.just(0)),
            st.tuples(st.just("finish"), keys_, st.just(0)),
            st.tuples(st.just("fail"), st.just(0), st.just(0)),  # the next write fails
            st.tuples(st.just("foreign"), keys_, st.just(0)),  # the kernel finds it foreign
            st.tuples(st.just("unavailable"), st.just(0), st.just(0)),  # the kernel is gone
        ),
        st.one_of(st.none(), keys_),  # then a new connection to this service, if any
    ),
    min_size=5,
    max_size=80,
)


def make_world(mode: Mode, lingers: bool) -> World:
    has_kernel = mode is not Mode.USERSPACE
    policy = OffloadPolicy(mode, HOLD_DOWN, CHURN_LIMIT)
    core = Placements(policy)
    core.enable(
        policy,
        "fake" if has_kernel else None,
        lingers,
        "lb0" if has_kernel else None,
        DRAIN_TIMEOUT,
    )
    core.local = {key(ELSEWHERE).listen.ip: "eth0"}
    return World(core, lingers, has_kernel)


@settings(deadline=None, max_examples=600)
@given(st.sampled_from(MODES), st.booleans(), st.booleans(), events)
def test_invariants_hold_over_any_sequence(
    mode_lingers: tuple[Mode, bool],
    warm: bool,
    with_foreign: bool,
    script: list[tuple[tuple[str, int, int], int | None]],
) -> None:
    mode, lingers = mode_lingers
    w = make_world(mode, lingers)
    state = dict.fromkeys(range(KEYS), (1, True, 0))  # weight, healthy, retries
    for i in range(KEYS):
        w.edit(service(i), key(i))
        w.check()
    if warm:  # start from services the kernel carries (auto: once calm)
        w.tick(HOLD_DOWN + 1)
        w.check()
    for (what, a, b), busy in script:
        if what == "tick":
            w.tick(float(a))
        elif what == "refresh":
            w.refresh()
        elif what == "fail":
            w.fail_next = w.has_kernel
        elif what == "finish":
            w.finish(key(a))
        elif what == "foreign":
            if with_foreign and w.has_kernel:
                w.foreign ^= {key(a)}
                w.forced.add(key(a))
        elif what == "remove":
            w.edit(None, key(a))
        elif what == "burst":
            weight, healthy, retries = state[a]
            for _ in range(b):
                weight = weight % 3 + 1
                w.edit(service(a, weight, healthy, retries), key(a))
                w.check()
                w.tick(1.0)
            state[a] = (weight, healthy, retries)
        elif what == "unavailable":
            if w.has_kernel and w.core.policy.unavailable is None:
                w.before_step()
                everything = {k for k in map(key, range(KEYS)) if w.core.record(k) is not None}
                w.step(w.core.kernel_unavailable("no kernel dataplane: gone", w.now), everything)
        else:
            weight, healthy, retries = state[a]
            if what == "edit":
                weight = b
            elif what == "health":
                healthy = bool(b)
            elif what == "retries":
                retries = b
            state[a] = (weight, healthy, retries)
            w.edit(service(a, weight, healthy, retries), key(a))
        w.check()
        if busy is not None:
            w.connect(key(busy))
    w.settle()


def test_an_idle_service_costs_nothing_at_10000() -> None:
    """10,000 services promoted and idle: a tick visits none of them; one edit visits
    one (and one due timer later, that one again)."""
    n = 10_000
    policy = OffloadPolicy(Mode.AUTO, HOLD_DOWN, CHURN_LIMIT)
    core = Placements(policy)
    core.enable(policy, "fake", True, None, DRAIN_TIMEOUT)
    services = [
        Service(
            f"s{i}",
            Protocol.TCP,
            Endpoint.parse(f"10.{i // 256}.{i % 256}.1:80"),
            SchedulerName.RR,
            backends=(Backend(Endpoint.parse("10.200.0.1:80")),),
            retries=0,
        )
        for i in range(n)
    ]
    first = core.edit(services, [], 0.0)
    assert first.kernel is not None and len(first.visited) == n
    core.applied(0.0)
    promoted = core.tick(HOLD_DOWN)
    assert len(promoted.visited) == n and len(promoted.moves) == n
    assert promoted.kernel is not None and len(promoted.kernel.changes.fresh) == n
    core.applied(HOLD_DOWN)
    ticks = 100
    start = time.perf_counter()
    for t in range(ticks):
        idle = core.tick(HOLD_DOWN + 1 + t)
        assert not idle.visited and idle.kernel is None and not idle.moves
    per_tick = (time.perf_counter() - start) / ticks
    assert per_tick < 0.001, f"{per_tick * 1e6:.0f} us per idle tick at {n} services"
    s7 = services[7].with_backends((Backend(Endpoint.parse("10.200.0.1:80"), 2),))
    edited = core.edit([s7], [], 200.0)
    assert len(edited.visited) == 1
    assert edited.kernel is not None and len(edited.kernel.changes.fresh) == 1
    core.applied(200.0)
    assert core.tick(205.0).visited == set()
    assert core.tick(210.0).visited == {services[7].key}  # its wait for calm ended
    core.check_invariants()


def test_a_demotion_drains_only_after_the_kernel_took_the_demoting_form() -> None:
    """A drained report from before the demoting form was in the kernel is no proof:
    connections may have come in since (the refresh is older than the write)."""
    policy = OffloadPolicy(Mode.IPVS, HOLD_DOWN, CHURN_LIMIT)
    core = Placements(policy)
    core.enable(policy, "ipvs", True, None, DRAIN_TIMEOUT)
    s = service(0)
    core.edit([s], [], 0.0)
    core.applied(0.0)
    assert core.placement(s.key) is Placement.KERNEL
    down = service(0, retries=1)  # not expressible any more: demote
    a = core.edit([down], [], 5.0, drained={s.key}, observed=4.0)
    assert [m.move for m in a.moves] == [Move.DEMOTE] and a.moves[0].drain
    assert core.placement(s.key) is Placement.DEMOTING
    assert a.kernel is not None
    core.apply_failed()  # the demoting form did not get there
    again = core.tick(6.0, drained={s.key}, observed=5.5)
    assert again.moves == [] and again.kernel is not None  # resent; not drained by that look
    assert core.placement(s.key) is Placement.DEMOTING
    core.applied(7.0)
    assert core.tick(8.0, drained={s.key}, observed=7.0).moves == []  # not after the write
    done = core.tick(9.0, drained={s.key}, observed=8.5)
    assert [m.move for m in done.moves] == [Move.DEMOTED]
    assert done.kernel is not None and done.kernel.changes.removed == [s.key]


def test_an_orphan_that_comes_back_keeps_draining() -> None:
    """A service that left while the kernel carried it lingers as an orphan; back in the
    config before it drained, in auto (not calm yet), it drains as a demotion would,
    rather than being deleted under its connections."""
    policy = OffloadPolicy(Mode.AUTO, HOLD_DOWN, CHURN_LIMIT)
    core = Placements(policy)
    core.enable(policy, "ipvs", True, None, DRAIN_TIMEOUT)
    s = service(0)
    core.edit([s], [], 0.0)
    core.applied(0.0)
    core.tick(HOLD_DOWN)
    core.applied(HOLD_DOWN)
    assert core.placement(s.key) is Placement.KERNEL
    gone = core.edit([], [s.key], 20.0)
    assert gone.kernel is not None and gone.kernel.changes.fresh[0].backends[0].weight == 0
    core.applied(20.0)
    back = core.edit([s], [], 21.0)
    assert core.placement(s.key) is Placement.DEMOTING
    assert back.kernel is not None and back.kernel.changes.removed == []
    core.check_invariants()


def test_check_invariants_names_a_broken_record() -> None:
    policy = OffloadPolicy(Mode.IPVS, HOLD_DOWN, CHURN_LIMIT)
    core = Placements(policy)
    core.enable(policy, "ipvs", True, None, DRAIN_TIMEOUT)
    s = service(0)
    core.edit([s], [], 0.0)
    r = core.record(s.key)
    assert r is not None
    r.placement = Placement.USERSPACE  # but the kernel is given the service
    with pytest.raises(InvariantError, match="USERSPACE but the kernel is given a form"):
        core.check_invariants()


def test_a_promote_into_a_kernel_without_affinity_waits_for_the_templates() -> None:
    """IPVS cannot take userspace's persistence templates (yet): the promote waits until
    they expire, so no client is scheduled afresh, but at most `affinity_wait`; a timer
    brings the key back (nothing else would visit an idle service)."""
    policy = OffloadPolicy(Mode.AUTO, HOLD_DOWN, CHURN_LIMIT)
    core = Placements(policy)
    core.enable(policy, "ipvs", True, None, DRAIN_TIMEOUT)
    expiry = {"until": 30.0}
    core.affinity_until = lambda key, now: expiry["until"]
    core.affinity_wait = 100.0
    s = service(0)
    core.edit([s], [], 0.0)
    core.applied(0.0)
    waiting = core.tick(HOLD_DOWN)  # calm: it would be promoted now
    assert waiting.moves == [] and core.placement(s.key) is Placement.USERSPACE
    assert "waits in userspace until its persistence templates expire" in (
        core.explain(s.key).reason
    )
    assert core.tick(29.0).visited == set()  # idle until the templates expire
    promoted = core.tick(30.0)
    assert [m.move for m in promoted.moves] == [Move.PROMOTE]
    core.check_invariants()

    # renewed again and again by a busy client: the wait ends at affinity_wait
    other = service(1)
    expiry["until"] = 10_000.0
    core.edit([other], [], 40.0)
    core.tick(40.0 + HOLD_DOWN)
    assert core.placement(other.key) is Placement.USERSPACE
    late = core.tick(40.0 + HOLD_DOWN + 100.0)
    assert [m.move for m in late.moves] == [Move.PROMOTE]
    assert "schedules their clients afresh" in core.explain(other.key).reason
    core.check_invariants()

    # a kernel that takes the templates along (nftables) does not wait
    core.affinity_until = None
    third = service(2)
    core.edit([third], [], 200.0)
    assert [m.move for m in core.tick(200.0 + HOLD_DOWN).moves] == [Move.PROMOTE]
