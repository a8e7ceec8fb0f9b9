"""What a TCP and a UDP service share at run time: config, the IPVS-like core, counters."""

from __future__ import annotations

import asyncio
import logging
import socket

from lb.log import emit
from lb.model import Backend, Endpoint, Service
from lb.plan import AddDest, DelDest, EditDest, plan_dests
from lb.sched import Dest
from lb.stats import BackendSnapshot, Counters, ServiceSnapshot
from lb.virtual_service import VirtualService

log = logging.getLogger("lb.proxy")


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

    # --- configuration -----------------------------------------------------------------

    def update(self, service: Service) -> None:
        """Take a new desired state for this service (same protocol and listen address)."""
        self.service = service
        core = self.core
        if (core.scheduler_name, core.flags, core.persistence) != (
            service.scheduler,
            service.flags,
            service.persistence,
        ):
            core.edit_service(service.scheduler, service.flags, service.persistence)
        self.reconcile()

    def reconcile(self) -> None:
        """Bring the core's destinations in line with the desired backends (lb.plan)."""
        core = self.core
        for op in plan_dests(core.views(self.loop.time()), self.service.backends):
            if isinstance(op, AddDest):
                core.add_dest(op.endpoint, op.weight, op.u_threshold, op.l_threshold)
                self.backend_counters.setdefault(op.endpoint, Counters())
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

    def tick(self) -> None:
        """Periodic housekeeping: run the core's timers, delete drained destinations."""
        self.reconcile()
        live = self.core.known_endpoints()
        for endpoint in list(self.backend_counters):
            if endpoint not in live:
                del self.backend_counters[endpoint]

    def counters_for(self, dest: Dest) -> Counters:
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

    def snapshot(self) -> ServiceSnapshot:
        core = self.core
        persistent = core.templates.per_dest()
        wanted: dict[Endpoint, Backend] = {b.address: b for b in self.service.backends}
        backends = []
        for d in core.dests:
            b = wanted.get(d.endpoint)
            backends.append(
                BackendSnapshot(
                    address=d.endpoint,
                    backend=b,
                    weight=d.weight,
                    active=d.active,
                    inactive=d.inactive,
                    persistent=persistent.get(d, 0),
                    overloaded=d.overloaded,
                    totals=self.counters_for(d).totals(),
                )
            )
        return ServiceSnapshot(
            service=self.service,
            dataplane="userspace",
            listening=self.listening,
            open=self.open,
            totals=self.counters.totals(),
            backends=tuple(backends),
        )
