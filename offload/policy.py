"""Which services go to the kernel, and how they look there: pure code, time passed in.

A service is offloaded when it is *expressible* (everything it uses exists in IPVS) and,
in `auto` mode, *stable* (unchanged for `hold_down`). Churn (too many changes within
`hold_down`) sends it back to userspace; calm brings it back.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lb.model import (
    TCP_IDLE_TIMEOUT,
    UDP_IDLE_TIMEOUT,
    AdminState,
    Backend,
    Mode,
    Protocol,
    SchedFlag,
    SchedulerName,
    Service,
    ServiceKey,
)
from lb.sched import SCHEDULERS
from offload.ipvs_model import F_PERSISTENT, F_SCHED1, F_SCHED2, KService
from offload.nft_rules import not_expressible_nft

#: A service this close to `hold_down` without changes counts as calm (float rounding of
#: the timer that wakes it).
CALM_SLACK = 1e-6


def kernel_service(s: Service) -> KService:
    """The IPVS service for `s`: scheduler, flags, persistence timeout and netmask."""
    flags = 0
    if SchedFlag.FALLBACK in s.flags:
        flags |= F_SCHED1
    if SchedFlag.PORT in s.flags:
        flags |= F_SCHED2
    timeout: int = 0
    prefix: int = s.listen.ip.max_prefixlen
    if s.persistence is not None:
        flags |= F_PERSISTENT
        timeout, prefix = s.persistence.timeout, s.persistence.prefix_len
    return KService(s.key, s.scheduler.value, flags, timeout, prefix)


def not_expressible(s: Service) -> str | None:
    """Why no kernel NAT path (IPVS or nftables) can carry `s` as configured, or None."""
    ip = s.listen.ip
    if ip.version == 6:
        return "IPv6 services are not offloaded yet"
    if ip.is_unspecified:
        return "a wildcard listen address cannot be a kernel VIP"
    if ip.is_loopback:
        return "a loopback VIP cannot be NATed by the kernel (use another address)"
    for b in s.backends:
        if b.address.family != s.listen.family:
            return f"kernel NAT cannot change address family (backend {b.address})"
        if b.address.ip.is_loopback:
            return f"backend {b.address} is on loopback, which kernel NAT cannot reach"
    if s.protocol is Protocol.TCP and s.retries > 0:
        return f"connect retry is userspace-only (retries: {s.retries}; set retries: 0 to offload)"
    if s.protocol is Protocol.TCP and s.max_connections:
        return "a service connection limit (max_connections) is userspace-only"
    default_idle = TCP_IDLE_TIMEOUT if s.protocol is Protocol.TCP else UDP_IDLE_TIMEOUT
    if s.idle_timeout != default_idle:
        return (
            "the kernel has one idle timeout per protocol for the whole host: "
            f"idle_timeout must be the default ({default_idle:g}s) to offload"
        )
    if s.access_log:
        return "the access log is userspace-only"
    # `allowed_sources` is no reason: both kernel paths drop a client outside them before
    # NAT (nftables in its own table, IPVS in the host's: offload/nft_rules.py, firewall_*),
    # in `ip` tables, so for an IPv4 VIP only
    if s.allowed_sources and ip.version != 4:
        return "the kernel's filter of allowed_sources is IPv4 only"
    if s.proxy_protocol is not None or s.accept_proxy_protocol:
        return (
            "the PROXY protocol (proxy_protocol, accept_proxy_protocol) is userspace-only:"
            " kernel NAT has no header to send or read"
        )
    # `source` is no reason either way: kernel NAT rewrites only the destination, so the
    # backends see the client's address, as a transparent relay's do (and must route the
    # client back through lb for both). `source: transparent` is what makes userspace
    # equal to the kernel paths; `proxy` (lb's address) is userspace's own.
    return None


def not_expressible_ipvs(s: Service) -> str | None:
    """Why the IPVS dataplane cannot carry `s`, or None."""
    reason = not_expressible(s)
    if reason is None and not SCHEDULERS[s.scheduler].ipvs:
        return f"scheduler {s.scheduler} has no IPVS module"
    return reason


def not_expressible_nftables(s: Service) -> str | None:
    """Why the nftables dataplane cannot carry `s`, or None."""
    return not_expressible(s) or not_expressible_nft(s)


def demoting_form(s: Service) -> Service:
    """How a service looks in the kernel while it moves back to userspace: new connections
    to the VIP:port itself (a local destination: the kernel hands them to the userspace
    listener unchanged), the NAT destinations quiesced so theirs finish. rr, no flags and no
    persistence, so that every new connection reaches the local destination."""
    # The local destination first: it is added before the others are quiesced, so that the
    # service always has a destination to give new connections to.
    backends = [Backend(s.listen, 1)] + [
        Backend(b.address, 0, AdminState.READY, b.max_connections, b.resume_below)
        for b in s.backends
    ]
    return Service(s.name, s.protocol, s.listen, SchedulerName.RR, backends=tuple(backends))


def orphan_form(s: Service) -> Service:
    """A service that left the config while in the kernel: no new connections, its own
    finish, then it goes."""
    return dataclasses.replace(s, backends=tuple(Backend(b.address, 0) for b in s.backends))


@dataclass(slots=True)
class Calm:
    """One service's history as the policy judges it: the service, when it last changed,
    and when it changed within the last `hold_down` (its churn). The placement core keeps
    one in each service's record (offload/placement.py)."""

    service: Service
    changed: float
    changes: list[float]  # a few at most (churn_limit): a list, not a deque (600 bytes)

    @classmethod
    def new(cls, s: Service, now: float) -> Calm:
        return cls(s, now, [now])

    def note(self, s: Service, now: float) -> bool:
        """`s` is the service now: whether that is a change (its wait for calm restarts).
        The same object, or an equal one (a reload's), is not."""
        if self.service is s:
            return False
        if self.service == s:
            self.service = s
            return False
        self.service = s
        self.changed = now
        self.changes.append(now)
        return True


@dataclass(frozen=True, slots=True)
class Want:
    kernel: bool
    reason: str


class OffloadPolicy:
    """The mode and its settings, and the judgement (`judge`) of one service's `Calm`.
    `observe` / `want` / `due` keep a `Calm` per key themselves, for callers without
    records of their own."""

    def __init__(
        self,
        mode: Mode,
        hold_down: float,
        churn_limit: int,
        check: Callable[[Service], str | None] = not_expressible,
    ) -> None:
        self.mode = mode
        self.hold_down = hold_down
        self.churn_limit = churn_limit
        self.check = check  # why the kernel dataplane in use cannot carry a service
        self.unavailable: str | None = None  # why no kernel dataplane can be used at all
        self._track: dict[ServiceKey, Calm] = {}
        self._timers: list[tuple[float, ServiceKey]] = []  # (end of a wait for calm, service)

    def observe(
        self, changed: Iterable[Service], removed: Iterable[ServiceKey], now: float
    ) -> None:
        """Note the services that are new or changed (config, backends, weights, health),
        and when, and those that left: the work is that of the change."""
        for s in changed:
            t = self._track.get(s.key)
            if t is None:
                self._track[s.key] = Calm.new(s, now)
            elif not t.note(s, now):
                continue
            if self.mode is Mode.AUTO:
                heapq.heappush(self._timers, (now + self.hold_down, s.key))
        for key in removed:
            self._track.pop(key, None)

    def want(self, key: ServiceKey, now: float, in_kernel: bool) -> Want:
        t = self._track.get(key)
        if t is None:
            return Want(False, "not in the config")
        return self.judge(t, now, in_kernel)

    def judge(self, t: Calm, now: float, in_kernel: bool) -> Want:
        """Whether the service of `t` should be in the kernel at `now` (`in_kernel`: it
        is there now): expressible, and in `auto` stable (calm for `hold_down`) and not
        churning (`churn_limit` changes within `hold_down`)."""
        if self.mode is Mode.USERSPACE:
            return Want(False, "dataplane: userspace")
        if self.unavailable is not None:
            return Want(False, self.unavailable)
        reason = self.check(t.service)
        if reason is not None:
            return Want(False, reason)
        if self.mode is not Mode.AUTO:
            return Want(True, f"dataplane: {self.mode}")
        recent = [c for c in t.changes if c > now - self.hold_down]
        if len(recent) != len(t.changes):
            t.changes = recent
        if in_kernel and len(t.changes) >= self.churn_limit:
            return Want(False, f"churn: {len(t.changes)} changes in the last {self.hold_down:g}s")
        calm = now - t.changed
        if not in_kernel and calm < self.hold_down - CALM_SLACK:  # not by a rounding (due())
            return Want(
                False, f"waiting for {self.hold_down:g}s without changes ({calm:.0f}s so far)"
            )
        return Want(True, "stable")

    def wait_ends(self, t: Calm) -> float | None:
        """When the service's wait for calm ends (None: not in `auto`, nothing to wait
        for): what `judge` says of it may change with time alone then."""
        return t.changed + self.hold_down if self.mode is Mode.AUTO else None

    def due(self, now: float) -> set[ServiceKey]:
        """The services whose wait for calm (`hold_down`) has ended by `now`: what `want`
        says of them may have changed with time alone."""
        due = set()
        while self._timers and self._timers[0][0] <= now:
            due.add(heapq.heappop(self._timers)[1])
        return {key for key in due if key in self._track}
