"""An in-memory stand-in for the kernel's IPVS, for unit tests of the reconciler (the real
one is exercised in the kernel tier, tests/kernel/)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from lb.model import Endpoint, ServiceKey
from offload.ipvs_model import KDest, KService, KStats


class FakeIpvs:
    def __init__(self) -> None:
        self.writes = 0
        self.log: list[str] = []
        self.svcs: dict[ServiceKey, KService] = {}
        self.lists: dict[ServiceKey, list[KDest]] = {}  # newest first, as the kernel keeps them

    async def services(self) -> list[KService]:
        return list(self.svcs.values())

    async def dests(self, key: ServiceKey) -> list[KDest]:
        return list(self.lists[key])

    def _w(self, what: str) -> None:
        self.writes += 1
        self.log.append(what)

    async def add_service(self, svc: KService) -> None:
        if svc.key in self.svcs:
            raise FileExistsError(svc.key)
        self._w(f"add-service {svc.key} {svc.scheduler}")
        self.svcs[svc.key] = svc
        self.lists[svc.key] = []

    async def set_service(self, svc: KService) -> None:
        self._w(f"set-service {svc.key} {svc.scheduler}")
        self.svcs[svc.key] = svc

    async def del_service(self, key: ServiceKey) -> None:
        self._w(f"del-service {key}")
        del self.svcs[key]
        del self.lists[key]

    async def add_dest(self, key: ServiceKey, dest: KDest) -> None:
        if any(d.endpoint == dest.endpoint for d in self.lists[key]):
            raise FileExistsError(dest.endpoint)
        self._w(f"add-dest {dest.endpoint} w{dest.weight}")
        self.lists[key].insert(0, dest)

    async def set_dest(self, key: ServiceKey, dest: KDest) -> None:
        self._w(f"set-dest {dest.endpoint} w{dest.weight}")
        self.lists[key] = [
            replace(dest, active=d.active, inactive=d.inactive)
            if d.endpoint == dest.endpoint
            else d
            for d in self.lists[key]
        ]

    async def del_dest(self, key: ServiceKey, endpoint: Endpoint) -> None:
        self._w(f"del-dest {endpoint}")
        self.lists[key] = [d for d in self.lists[key] if d.endpoint != endpoint]

    async def close(self) -> None:
        pass

    @asynccontextmanager
    async def hold(self, key: ServiceKey) -> AsyncIterator[None]:
        """What Host.hold does to new connections, as entries in the log."""
        self.log.append(f"hold {key}")
        try:
            yield
        finally:
            self.log.append(f"release {key}")

    def set_conns(
        self, key: ServiceKey, endpoint: Endpoint, active: int, inactive: int = 0
    ) -> None:
        """Connections came or went: their packets move the service's counters too, as in
        the kernel (a refresh re-reads the destinations of a service whose counters moved)."""
        self.lists[key] = [
            replace(d, active=active, inactive=inactive) if d.endpoint == endpoint else d
            for d in self.lists[key]
        ]
        svc = self.svcs[key]
        moved = KStats(svc.stats.conns + 1, svc.stats.inpkts + 1, svc.stats.outpkts + 1)
        self.svcs[key] = replace(svc, stats=moved)
