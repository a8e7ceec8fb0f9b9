"""Where each service is carried: the offload manager's decisions as pure code.

One `Record` per service key, time passed in, no I/O. Events go in, `Actions` come out,
and offload/manager.py only executes them (logs the moves, hands the kernel dataplane
its forms, reports back):

- `edit(changed, removed, now, ...)`: the desired services changed (after the userspace
  dataplane took them);
- `tick(now, ...)`: time passed; the `drained` keys of both (those of `draining()` the
  kernel says have no connection left, as seen by its refresh at `observed`) are the
  "drain finished" events;
- `applied(now, foreign)` / `apply_failed()`: the kernel took the last `KernelWrite`, or
  did not;
- `kernel_unavailable(reason, now)`: no kernel path any more;
- `claim(new)` / `unclaim(keys)` / `local`: the VIPs lb keeps on its device.

What is offloaded comes from offload/policy.py (expressible, stable, churning: `judge`
over the record's `Calm`); this module decides the moves and the kernel's forms.

Invariants (`check_invariants`; tests/test_placement.py drives random sequences of
edits, health changes, ticks, drains and failed applies through them):

1. One path takes a VIP:port's new connections. A key is KERNEL exactly when the
   kernel's form for it is the service itself; DEMOTING when it is the service's
   `demoting_form` (new connections go to the local destination: the userspace
   listener); an orphan (left the config while the kernel carried it) has the
   `orphan_form` (no new connections at all); USERSPACE keys have no form. No form but a
   KERNEL one gives a NAT destination a weight.
2. No move resets a connection. With a kernel that `lingers` (IPVS: deleting a service
   resets its connections), a key leaves the kernel only through a form that takes no
   new NAT connection (demoting or orphan), and its delete is asked for only once an
   observation made after the kernel confirmed that form says it is drained, or (a
   demotion) after `drain_timeout`. A key the kernel carries never goes from KERNEL to
   no form in one step; an orphan that comes back to the config keeps draining rather
   than being deleted.
3. Churn is bounded. In `auto` a key is promoted only after `hold_down` without a
   change, and demoted once `churn_limit` changes fall within `hold_down`: the kernel
   gets at most `churn_limit` writes of a service's own form (the promote and its
   updates) within any `hold_down`, and at most one promote.
4. Idle keys cost nothing. A step visits the keys its event names, those whose wait
   for calm ends by then (one timer per record: its last change's) and those draining;
   `visits` counts them.
"""

from __future__ import annotations

import enum
import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from lb.changes import Changes
from lb.model import Endpoint, IPAddress, Service, ServiceKey
from lb.stats import Offload, Placement
from offload.policy import Calm, OffloadPolicy, Want, demoting_form, orphan_form

#: What `explain` says of a key it has no reason for.
DEFAULT_REASON = "dataplane: userspace"


class Move(enum.StrEnum):
    """A service's move, as logged (the event names of docs/operating.md)."""

    PROMOTE = "offload.promote"  # the kernel takes its new connections
    DEMOTE = "offload.demote"  # userspace takes them back (drain: the kernel lingers)
    DEMOTED = "offload.demoted"  # back in userspace, nothing of it left in the kernel


@dataclass(frozen=True, slots=True)
class Moved:
    move: Move
    key: ServiceKey
    name: str
    reason: str | None
    drain: bool = False  # DEMOTE: its kernel connections drain first (demoting form)


@dataclass(frozen=True, slots=True)
class KernelWrite:
    """Give the kernel dataplane `forms` (all it should carry), `changes` saying which
    forms are new and which keys go. Report back with `applied` or `apply_failed`."""

    forms: list[Service]
    changes: Changes


@dataclass(slots=True)
class Actions:
    moves: list[Moved] = field(default_factory=list)  # to log, in order
    kernel: KernelWrite | None = None
    visited: set[ServiceKey] = field(default_factory=set)  # the records this step looked at
    wake: float | None = None  # when a timer next asks for a look (ticks find it)


@dataclass(slots=True, eq=False)
class Record:
    """Everything decided about one key."""

    key: ServiceKey
    calm: Calm | None = None  # the desired service and its changes; None: not in the config
    placement: Placement = Placement.USERSPACE
    reason: str = DEFAULT_REASON
    drain_started: float | None = None  # DEMOTING or orphan: since when
    orphan: Service | None = None  # left the config while the kernel carried it
    form: Service | None = None  # what the kernel is given for the key
    # what `form` was made from (service, placement), and the form: one object per service
    # and placement, so the kernel sees no change where there is none
    made: tuple[Service, Placement | None, Service] | None = None
    confirmed: float | None = None  # when the kernel took `form` (None: not yet)
    vip: IPAddress | None = None  # the VIP on lb's device this key keeps there
    wake: float | None = None  # when its wait (for calm, or affinity) ends: a timer then
    affinity_since: float | None = None  # waiting for its templates to expire, since

    @property
    def service(self) -> Service | None:
        return self.calm.service if self.calm is not None else None

    def idle(self) -> bool:
        """Nothing left to remember: the record can go."""
        return self.calm is None and self.orphan is None and self.form is None and self.vip is None


class InvariantError(AssertionError):
    pass


class Placements:
    """The records and the decisions over them. Work is that of the event: a step visits
    only the keys it names, those a timer is due for and those draining."""

    def __init__(self, policy: OffloadPolicy) -> None:
        self.policy = policy
        self.kernel: str | None = None  # the kernel dataplane's name; None: none
        self.lingers = False  # deleting a service from that kernel cuts its connections
        self.device: str | None = None  # lb's device (None: no host set up)
        self.drain_timeout = 300.0
        #: A kernel that cannot take persistence templates (IPVS today): when the key's
        #: templates in userspace will all have expired (None: it has none). Its promote
        #: waits until then, at most `affinity_wait`: a client keeps its backend rather
        #: than being scheduled afresh by the kernel. None: the kernel takes them along.
        self.affinity_until: Callable[[ServiceKey, float], float | None] | None = None
        self.affinity_wait = 300.0
        #: the host's addresses and their devices (from the executor's reads)
        self.local: dict[IPAddress, str] = {}
        self.foreign: frozenset[ServiceKey] = frozenset()  # keys another program serves
        self.visits = 0  # records visited, over all steps
        self._records: dict[ServiceKey, Record] = {}
        # indexes over the records, kept with them (check_invariants says so)
        self._forms: dict[ServiceKey, Service] = {}  # key -> record.form, where there is one
        self._draining: set[ServiceKey] = set()  # DEMOTING or orphan
        self._vips: Counter[IPAddress] = Counter()  # VIP -> records keeping it
        self._timers: list[tuple[float, ServiceKey]] = []  # (record.wake, key), lazily pruned
        self._dirty: set[ServiceKey] = set()  # keys whose form the kernel has not been told
        self._stale = True  # the kernel needs an apply even with nothing dirty

    def enable(
        self,
        policy: OffloadPolicy,
        kernel: str | None,
        lingers: bool,
        device: str | None,
        drain_timeout: float,
    ) -> None:
        """The mode and the kernel path, before the first event."""
        self.policy = policy
        self.kernel = kernel
        self.lingers = lingers and kernel is not None
        self.device = device
        self.drain_timeout = drain_timeout

    # --- queries ---------------------------------------------------------------------------

    def record(self, key: ServiceKey) -> Record | None:
        return self._records.get(key)

    def service(self, key: ServiceKey) -> Service | None:
        """The desired service of `key` (None: not in the config)."""
        r = self._records.get(key)
        return r.service if r is not None else None

    def shown(self, key: ServiceKey) -> Service | None:
        """The service as configured for a kernel snapshot of `key` (an orphan's last)."""
        r = self._records.get(key)
        if r is None:
            return None
        return r.service or r.orphan

    def placement(self, key: ServiceKey) -> Placement:
        r = self._records.get(key)
        return r.placement if r is not None else Placement.USERSPACE

    def explain(self, key: ServiceKey) -> Offload:
        r = self._records.get(key)
        if r is None:
            return Offload(Placement.USERSPACE, DEFAULT_REASON)
        return Offload(r.placement, r.reason)

    def draining(self) -> dict[ServiceKey, Endpoint | None]:
        """The keys waiting for their kernel connections to finish, and the destination
        whose connections do not count (a demotion's local one; None for an orphan, which
        must also be in the kernel to count as drained)."""
        return {
            key: (None if self._records[key].orphan is not None else key.listen)
            for key in self._draining
        }

    def needed_vips(self) -> AbstractSet[IPAddress]:
        """The VIPs some record keeps on lb's device (a view: no copy)."""
        return self._vips.keys()

    def next_wake(self) -> float | None:
        while self._timers:
            t, key = self._timers[0]
            r = self._records.get(key)
            if r is not None and r.wake == t:
                return t
            heapq.heappop(self._timers)
        return None

    # --- events ----------------------------------------------------------------------------

    def claim(self, new: Iterable[Service]) -> None:
        """New services are about to bind: each keeps its VIP on lb's device unless the
        host has it on another device (then its service stays in userspace)."""
        if self.device is None:
            return
        for s in new:
            ip = s.listen.ip
            if ip.is_unspecified or self.local.get(ip, self.device) != self.device:
                continue
            r = self._records.get(s.key)
            if r is None:
                r = self._records[s.key] = Record(s.key)
            if r.vip is None:
                r.vip = ip
                self._vips[ip] += 1

    def unclaim(self, keys: Iterable[ServiceKey]) -> None:
        """The services `claim` was told of did not bind after all: their keys let go of
        their VIPs (those that are not in the config otherwise)."""
        for key in keys:
            r = self._records.get(key)
            if r is not None and r.calm is None and r.orphan is None:
                self._release_vip(r)
                self._forget_if_idle(r)

    def edit(
        self,
        changed: Iterable[Service],
        removed: Iterable[ServiceKey],
        now: float,
        drained: Iterable[ServiceKey] = (),
        observed: float | None = None,
    ) -> Actions:
        """The desired services changed: `changed` are new or changed (maybe an equal new
        object), `removed` left. Visits those, and the keys due or draining."""
        touched: set[ServiceKey] = set()
        for s in changed:
            touched.add(s.key)
            r = self._records.get(s.key)
            if r is None:
                r = self._records[s.key] = Record(s.key)
            if r.calm is None:
                r.calm = Calm.new(s, now)
            elif not r.calm.note(s, now):
                continue
            wake = self.policy.wait_ends(r.calm)
            if wake is not None:
                r.wake = wake
                heapq.heappush(self._timers, (wake, s.key))
        for key in removed:
            touched.add(key)
            r = self._records.get(key)
            if r is not None:
                r.calm = None
                r.wake = None
        return self._step(touched, now, set(drained), observed)

    def tick(
        self, now: float, drained: Iterable[ServiceKey] = (), observed: float | None = None
    ) -> Actions:
        """Time passed: visit the keys whose wait for calm ended and those draining
        (`drained`: those of `draining()` the kernel found drained by its look at
        `observed`)."""
        return self._step(set(), now, set(drained), observed)

    def applied(self, now: float, foreign: Iterable[ServiceKey] = ()) -> Actions:
        """The kernel took the last `KernelWrite` at `now`; `foreign`: the keys it found
        another program's. Keys that became or stopped being foreign are decided again
        (nothing else would look at them); the result may be one more write."""
        for key in self._dirty:
            r = self._records.get(key)
            if r is not None:
                r.confirmed = now
        self._dirty = set()
        self._stale = False
        before, self.foreign = self.foreign, frozenset(foreign)
        flipped = {k for k in before ^ self.foreign if self.service(k) is not None}
        if not flipped:
            return Actions()
        return self._step(flipped, now, set(), None, timers=False)

    def apply_failed(self) -> None:
        """The kernel did not take the last write (or only part of it): the next step
        gives it everything again, the dirty keys as changed."""
        self._stale = True

    def kernel_unavailable(self, reason: str, now: float) -> Actions:
        """No kernel path any more: every service is decided again (a global event: the
        one step that visits every record)."""
        self.policy.unavailable = reason
        return self._step(set(self._records), now, set(), None)

    # --- the decisions ---------------------------------------------------------------------

    def _due(self, now: float) -> set[ServiceKey]:
        due = set()
        timers = self._timers
        while timers and timers[0][0] <= now:
            t, key = heapq.heappop(timers)
            r = self._records.get(key)
            if r is not None and r.wake == t:
                r.wake = None
                due.add(key)
        return due

    def _step(
        self,
        keys: set[ServiceKey],
        now: float,
        drained: set[ServiceKey],
        observed: float | None,
        timers: bool = True,
    ) -> Actions:
        out = Actions()
        if timers:
            keys = keys | self._due(now) | self._draining
        for key in keys:
            r = self._records.get(key)
            if r is None:
                continue
            out.visited.add(key)
            ok = (
                key in drained
                and observed is not None
                and r.confirmed is not None
                and observed > r.confirmed  # looked after the kernel took the form
            )
            if r.calm is None:
                self._leave(r, now, ok)
            else:
                self._stay(r, now, ok, out)
            self._forget_if_idle(r)
        self.visits += len(out.visited)
        if self.kernel is not None and (self._dirty or self._stale):
            forms = self._forms
            out.kernel = KernelWrite(
                list(forms.values()),
                Changes(
                    [forms[k] for k in self._dirty if k in forms],
                    [k for k in self._dirty if k not in forms],
                ),
            )
        out.wake = self.next_wake()
        return out

    def _leave(self, r: Record, now: float, drained: bool) -> None:
        """A key not in the config: its service left (the kernel keeps an orphan while
        its connections finish, if it lingers), or it is an orphan still draining."""
        if r.placement is not Placement.USERSPACE:
            if self.lingers and r.made is not None:
                r.orphan = r.made[0]
                r.drain_started = now
                r.confirmed = None  # the orphan form is to be confirmed
                self._draining.add(r.key)
            r.placement = Placement.USERSPACE
        r.reason = DEFAULT_REASON
        if r.orphan is not None and drained:
            r.orphan = None
        if r.orphan is None:
            r.drain_started = None
            self._draining.discard(r.key)
            self._release_vip(r)
        self._give(r, r.orphan, None)

    def _stay(self, r: Record, now: float, drained: bool, out: Actions) -> None:
        """A key in the config: placed as the policy says, moved if that changed."""
        assert r.calm is not None
        if r.orphan is not None:  # back in the config while its orphan drains
            r.orphan = None
            comes_back = self._want(r, now).kernel
            # the kernel takes it again at once, or it keeps draining (a delete would
            # reset the orphan's connections)
            r.placement = Placement.USERSPACE if comes_back else Placement.DEMOTING
            r.drain_started = None if comes_back else now  # a demotion from now on
            if comes_back:
                self._draining.discard(r.key)
            drained = False  # that look was at the orphan's form
        self._decide(r, now, drained, out)
        self._give(r, r.calm.service, r.placement)

    def _want(self, r: Record, now: float) -> Want:
        assert r.calm is not None
        s = r.calm.service
        if self.device is not None and self.local.get(s.listen.ip, self.device) != self.device:
            where = self.local[s.listen.ip]
            return Want(
                False,
                f"VIP {s.listen.ip} is on {where}: lb offloads only VIPs on {self.device}",
            )
        if self.kernel is not None and s.key in self.foreign:
            return Want(False, f"an IPVS service lb does not own already uses {s.key}")
        return self.policy.judge(r.calm, now, r.placement is Placement.KERNEL)

    def _decide(self, r: Record, now: float, drained: bool, out: Actions) -> None:
        assert r.calm is not None
        s = r.calm.service
        w = self._want(r, now)
        r.reason = w.reason
        current = r.placement
        if w.kernel and current is Placement.USERSPACE and self._waits_for_affinity(r, now):
            pass
        elif w.kernel and current is Placement.USERSPACE:
            r.placement = Placement.KERNEL
            r.drain_started = None
            self._draining.discard(r.key)
            out.moves.append(Moved(Move.PROMOTE, r.key, s.name, w.reason))
        elif not w.kernel and current is Placement.KERNEL:
            out.moves.append(Moved(Move.DEMOTE, r.key, s.name, w.reason, drain=self.lingers))
            if self.lingers:
                r.placement = Placement.DEMOTING
                r.drain_started = now
                self._draining.add(r.key)
            else:
                r.placement = Placement.USERSPACE
                out.moves.append(Moved(Move.DEMOTED, r.key, s.name, None))
        elif current is Placement.DEMOTING and self.kernel is not None:
            started = r.drain_started if r.drain_started is not None else now
            if drained or now - started >= self.drain_timeout:
                r.placement = Placement.USERSPACE
                r.drain_started = None
                self._draining.discard(r.key)
                out.moves.append(Moved(Move.DEMOTED, r.key, s.name, None))
                if w.kernel:  # calm again meanwhile: no timer will bring it up, so now
                    self._decide(r, now, False, out)

    def _waits_for_affinity(self, r: Record, now: float) -> bool:
        """A promote into a kernel that cannot take the key's templates waits for them to
        expire (then a timer brings the key back), for at most `affinity_wait`, after
        which it goes ahead and says how many clients may be scheduled afresh."""
        until = self.affinity_until(r.key, now) if self.affinity_until is not None else None
        if until is None or until <= now:
            r.affinity_since = None
            return False
        since = r.affinity_since if r.affinity_since is not None else now
        deadline = min(until, since + self.affinity_wait)
        if now >= deadline:
            r.affinity_since = None
            r.reason += (
                f"; its persistence templates did not expire within affinity_wait "
                f"({self.affinity_wait:g}s): {self.kernel} schedules their clients afresh"
            )
            return False
        r.affinity_since = since
        r.reason = (
            f"waits in userspace until its persistence templates expire (at most "
            f"{deadline - now:.0f}s more): {self.kernel} cannot take them"
        )
        if r.wake is None or r.wake > deadline:
            r.wake = deadline
            heapq.heappush(self._timers, (deadline, r.key))
        return True

    def _give(self, r: Record, s: Service | None, placement: Placement | None) -> None:
        """Set what the kernel gets for the key: `s` as placed (placement None: an orphan;
        s None: nothing); a key whose form changed is dirty (the next write tells it)."""
        form: Service | None = None
        if s is not None and placement is not Placement.USERSPACE:
            made = r.made
            if made is not None and made[0] is s and made[1] is placement:
                form = made[2]
            else:
                if placement is Placement.KERNEL:
                    form = s
                elif placement is Placement.DEMOTING:
                    form = demoting_form(s)
                else:
                    form = orphan_form(s)
                r.made = (s, placement, form)
        elif s is not None:
            r.made = (s, placement, s)
        else:
            r.made = None
        if r.form is form:
            return
        r.form = form
        r.confirmed = None
        if form is None:
            del self._forms[r.key]
        else:
            self._forms[r.key] = form
        self._dirty.add(r.key)

    def _release_vip(self, r: Record) -> None:
        if r.vip is None:
            return
        self._vips[r.vip] -= 1
        if self._vips[r.vip] <= 0:
            del self._vips[r.vip]
        r.vip = None

    def _forget_if_idle(self, r: Record) -> None:
        if r.idle():
            del self._records[r.key]

    # --- invariants ------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise InvariantError naming the first rule a record breaks (see the module's
        docstring); O(records): for tests."""

        def fail(r: Record, what: str) -> None:
            raise InvariantError(f"{r.key}: {what} ({r})")

        vips: Counter[IPAddress] = Counter()
        for key, r in self._records.items():
            if r.key != key:
                fail(r, "filed under another key")
            s = r.service
            p = r.placement
            # 1. one path for new connections: the placement and the kernel's form agree
            if s is None:
                if p is not Placement.USERSPACE:
                    fail(r, "placed but not in the config")
                if r.orphan is not None:
                    if r.form is None or r.made is None or r.made[0] is not r.orphan:
                        fail(r, "an orphan without its orphan form")
                elif r.form is not None:
                    fail(r, "a form for a key neither in the config nor an orphan")
            else:
                if r.orphan is not None:
                    fail(r, "an orphan in the config")
                if p is Placement.KERNEL and r.form is not s:
                    fail(r, "KERNEL but the kernel is not given the service")
                if p is Placement.DEMOTING and (
                    r.form is None or r.made is None or r.made[0] is not s or r.form is s
                ):
                    fail(r, "DEMOTING without the demoting form")
                if p is Placement.USERSPACE and r.form is not None:
                    fail(r, "USERSPACE but the kernel is given a form")
            if r.form is not None and p is not Placement.KERNEL:
                nat = [
                    b for b in r.form.backends if b.address != key.listen and b.effective_weight > 0
                ]
                if nat:
                    fail(r, f"a form that is not KERNEL gives NAT destinations weight: {nat}")
            if self.kernel is None and (p is not Placement.USERSPACE or r.form is not None):
                fail(r, "placed in a kernel there is none of")
            # 2. no reset: what lingers is drained, not deleted
            draining = p is Placement.DEMOTING or r.orphan is not None
            if draining != (key in self._draining) or draining != (r.drain_started is not None):
                fail(r, "draining, the draining set and drain_started disagree")
            if (r.orphan is not None or p is Placement.DEMOTING) and not self.lingers:
                fail(r, "draining in a kernel that does not linger")
            # indexes
            if self._forms.get(key) is not r.form:
                fail(r, "the forms index disagrees")
            if r.form is not None and r.confirmed is not None and key in self._dirty:
                fail(r, "confirmed but dirty")
            if r.vip is not None:
                vips[r.vip] += 1
            # 4. timers: one per record, and a record that waits has one
            if r.wake is not None and (r.wake, key) not in self._timers:
                fail(r, "waits for calm without a timer")
            if r.idle():
                fail(r, "an idle record kept")
        if vips != self._vips:
            raise InvariantError(f"VIP counts disagree: {vips} != {self._vips}")
        if not self._forms.keys() <= self._records.keys():
            raise InvariantError("a form without a record")
        if not self._draining <= self._records.keys():
            raise InvariantError("a draining key without a record")
