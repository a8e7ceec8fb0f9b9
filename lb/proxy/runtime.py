"""What a TCP and a UDP service share at run time: config, the IPVS-like core, counters."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable

from lb.exhaustion import DESCRIPTORS, EXHAUSTION, resource_of
from lb.log import emit
from lb.model import Backend, Endpoint, Service
from lb.plan import AddDest, DelDest, EditDest, plan_dests
from lb.rates import NOTHING, Marks, marks
from lb.sched import Dest
from lb.stats import BackendSnapshot, Counters, ErrorReason, ServiceSnapshot, Totals
from lb.virtual_service import VirtualService

log = logging.getLogger("lb.proxy")


def _asleep(rt: ServiceRuntime) -> None:
    """The wake hook of a runtime no dataplane drives (tests)."""


access_log = logging.getLogger("lb.access")

#: An ErrorLog's tables before its first error (shared, never written to).
_NONE_LAST: dict[tuple[Endpoint | None, ErrorReason], float] = {}
_NONE_PENDING: dict[tuple[Endpoint | None, ErrorReason], int] = {}

#: What a backend that has had no connection yet shows (never counted into).
_UNUSED = Counters()

#: Connection errors are logged once per service, backend and reason per this many seconds,
#: with a count of the ones in between: a failing backend must not flood the log.
ERROR_LOG_INTERVAL = 10.0


class ErrorLog:
    """One log event per error class (service, backend, reason) at most every interval."""

    __slots__ = ("_last", "_pending", "service")

    def __init__(self, service: str) -> None:
        self.service = service
        # made at the first error: most services of a large node never have one
        self._last: dict[tuple[Endpoint | None, ErrorReason], float] = _NONE_LAST
        self._pending: dict[tuple[Endpoint | None, ErrorReason], int] = _NONE_PENDING

    def note(self, now: float, backend: Endpoint | None, reason: ErrorReason) -> None:
        if self._last is _NONE_LAST:
            self._last, self._pending = {}, {}
        key = (backend, reason)
        last = self._last.get(key)
        if last is not None and now - last < ERROR_LOG_INTERVAL:
            self._pending[key] = self._pending.get(key, 0) + 1
            return
        self._emit(now, key, self._pending.pop(key, 0) + 1)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def flush(self, now: float) -> None:
        for key in [k for k in self._pending if now - self._last[k] >= ERROR_LOG_INTERVAL]:
            self._emit(now, key, self._pending.pop(key))

    def _emit(self, now: float, key: tuple[Endpoint | None, ErrorReason], count: int) -> None:
        backend, reason = key
        self._last[key] = now
        where = (
            f"backend {backend} of service {self.service}" if backend else f"service {self.service}"
        )
        emit(
            log,
            logging.WARNING,
            "connection.error",
            f"{where}: {count} connection{'s' if count > 1 else ''} {reason.describe()}",
            service=self.service,
            backend=str(backend) if backend else None,
            reason=reason.value,
            count=count,
        )


class ServiceRuntime:
    """Base of TcpService and UdpService."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, service: Service, sock: socket.socket
    ) -> None:
        self.loop = loop
        self.service = service
        self.sock = sock
        self.core = VirtualService(
            service.protocol, service.listen, service.scheduler, service.flags, service.persistence
        )
        self.counters = Counters()
        self.backend_counters: dict[Endpoint, Counters] = {}
        self.listening = False
        self.error_log = ErrorLog(service.name)
        #: Called when something happens that housekeeping and the rate sampler must see
        #: (a connection, an error, a change of config); the dataplane sets it.
        self.wake: Callable[[ServiceRuntime], None] = _asleep
        #: the service's rated counters when the rate estimator last had them (None: never)
        self.sampled: Marks | None = None

    # --- reporting ----------------------------------------------------------------------

    def allows(self, host: str) -> bool:
        """Whether a client at `host` may use the service (`allowed_sources`)."""
        nets = self.service.allowed_sources
        if not nets:
            return True
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        return any(ip in net for net in nets)

    def refused(self, reason: ErrorReason) -> None:
        """A client was refused or a datagram dropped (counted for the service)."""
        self.counters.error(reason)
        self.error_log.note(self.loop.time(), None, reason)
        self.wake(self)

    def over_budget(self, n: int, what: str) -> bool:
        """Whether `n` more descriptors are past the data path's budget (lb.exhaustion):
        then counted, and the caller refuses the client; else they are taken."""
        if DESCRIPTORS.take(n):
            return False
        EXHAUSTION.note("descriptors", what, self.loop.time())
        self.refused(ErrorReason.EXHAUSTED)
        return True

    def exhausted(self, e: OSError, what: str) -> bool:
        """Whether `e` says lb is out of a resource (then counted and logged,
        lb.exhaustion): the caller refuses the client for it, not the backend's fault."""
        resource = resource_of(e)
        if resource is None:
            return False
        EXHAUSTION.note(resource, what, self.loop.time())
        return True

    def failed(self, dest: Dest, counters: Counters, reason: ErrorReason) -> None:
        """An attempt to reach a backend failed (counted for the backend)."""
        counters.error(reason)
        self.error_log.note(self.loop.time(), dest.endpoint, reason)
        self.wake(self)

    def access(
        self,
        peer: tuple[str, int] | None,
        backend: Endpoint | None,
        end: str,
        *,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
    ) -> None:
        """The optional access log: one event per connection or flow, when it ends."""
        host, port = peer[:2] if peer else ("?", 0)
        client = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        emit(
            access_log,
            logging.INFO,
            "access",
            f"{client} -> {backend or '-'}: {end}, {bytes_in} bytes in, {bytes_out} out,"
            f" {seconds:.3f}s",
            service=self.service.name,
            client=client,
            backend=str(backend) if backend else None,
            end=end,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            duration=round(seconds, 6),
        )

    # --- configuration -----------------------------------------------------------------

    def update(self, service: Service) -> None:
        """Take a new desired state for this service (same protocol and listen address)."""
        self.service = service
        self.error_log.service = service.name
        core = self.core
        if (core.scheduler_name, core.flags, core.persistence) != (
            service.scheduler,
            service.flags,
            service.persistence,
        ):
            core.edit_service(service.scheduler, service.flags, service.persistence)
        self.reconcile()
        self.wake(self)

    def reconcile(self) -> None:
        """Bring the core's destinations in line with the desired backends (lb.plan)."""
        core = self.core
        for op in plan_dests(core.views(self.loop.time()), self.service.backends):
            if isinstance(op, AddDest):
                core.add_dest(op.endpoint, op.weight, op.u_threshold, op.l_threshold)
            elif isinstance(op, EditDest):
                core.edit_dest(op.endpoint, op.weight, op.u_threshold, op.l_threshold)
            elif isinstance(op, DelDest):
                core.del_dest(op.endpoint)
                emit(
                    log,
                    logging.INFO,
                    "backend.deleted",
                    f"backend {op.endpoint} of service {self.service.name} drained and deleted",
                    service=self.service.name,
                    backend=str(op.endpoint),
                )

    def tick(self) -> bool:
        """Housekeeping: run the core's timers, delete drained destinations, flush the
        error log. True when there is nothing left to do until the next wake."""
        self.reconcile()
        self.error_log.flush(self.loop.time())
        live = self.core.known_endpoints()
        for endpoint in list(self.backend_counters):
            if endpoint not in live:
                del self.backend_counters[endpoint]
        return self.open == 0 and not self.error_log.pending and self.core.idle()

    def _totals_of(self, dest: Dest) -> Totals:
        return self.backend_counters.get(dest.endpoint, _UNUSED).totals()

    def counters_for(self, dest: Dest) -> Counters:
        """A backend's counters, made at its first connection (a backend never used
        costs none: 11 MB at 100,000 backends)."""
        c = self.backend_counters.get(dest.endpoint)
        if c is None:
            c = self.backend_counters[dest.endpoint] = Counters()
        return c

    # --- lifecycle (overridden) ----------------------------------------------------------

    @property
    def open(self) -> int:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    def stop_listening(self) -> None:
        raise NotImplementedError

    def abort_all(self) -> None:
        raise NotImplementedError

    # --- observation --------------------------------------------------------------------

    def sample(self) -> ServiceSnapshot | None:
        """For the rate estimator (lb.rates): a snapshot if the counters moved since it
        last had one (a service's move with its backends': none moves alone), or, the
        first time, the baseline, which for a service that counted nothing yet needs no
        backend (they are zero too)."""
        now = marks(self.counters)
        if now == self.sampled:
            return None
        first, self.sampled = self.sampled is None, now
        if first and now == NOTHING:
            return self.snapshot(with_backends=False)
        return self.snapshot()

    def snapshot(self, with_backends: bool = True) -> ServiceSnapshot:
        return ServiceSnapshot(
            service=self.service,
            dataplane="userspace",
            listening=self.listening,
            open=self.open,
            totals=self.counters.totals(),
            backends=self._backend_snapshots() if with_backends else (),
        )

    def _backend_snapshots(self) -> tuple[BackendSnapshot, ...]:
        core = self.core
        persistent = core.templates.per_dest()
        wanted: dict[Endpoint, Backend] = {b.address: b for b in self.service.backends}
        return tuple(
            BackendSnapshot(
                address=d.endpoint,
                backend=wanted.get(d.endpoint),
                weight=d.weight,
                active=d.active,
                inactive=d.inactive,
                persistent=persistent.get(d, 0),
                overloaded=d.overloaded,
                totals=self._totals_of(d),
            )
            for d in core.dests
        )
