"""Helpers to drive a VirtualService by names, as `ipvsadm` would."""

from __future__ import annotations

import ipaddress

from lb.model import Endpoint, Persistence, Protocol, SchedFlag, SchedulerName
from lb.virtual_service import Conn, VirtualService

VIP = Endpoint(ipaddress.ip_address("10.0.0.100"), 80)
NAMES = "ABCDEFGH"


def ep(name: str) -> Endpoint:
    """A -> 192.168.1.1:8080, B -> 192.168.1.2:8080, ..."""
    return Endpoint(ipaddress.ip_address(f"192.168.1.{NAMES.index(name) + 1}"), 8080)


def name_of(endpoint: Endpoint) -> str:
    return NAMES[int(str(endpoint.ip).rsplit(".", 1)[1]) - 1]


def client(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


class Harness:
    def __init__(
        self,
        scheduler: str,
        flags: frozenset[SchedFlag] = frozenset(),
        persistence: Persistence | None = None,
        protocol: Protocol = Protocol.TCP,
        vip: Endpoint = VIP,
    ) -> None:
        self.vs = VirtualService(protocol, vip, SchedulerName(scheduler), flags, persistence)
        self.now = 0.0

    def add(self, name: str, weight: int = 1, upper: int = 0, lower: int = 0) -> Harness:
        self.vs.add_dest(ep(name), weight, upper, lower)
        return self

    def edit(self, name: str, weight: int, upper: int = 0, lower: int = 0) -> Harness:
        self.vs.edit_dest(ep(name), weight, upper, lower)
        return self

    def delete(self, name: str) -> Harness:
        self.vs.del_dest(ep(name))
        return self

    def order(self) -> str:
        return "".join(name_of(d.endpoint) for d in self.vs.dests)

    def open(self, src: str = "172.16.0.1", port: int = 40000) -> Conn | None:
        return self.vs.connect(client(src), port, self.now)

    def pick(self, src: str = "172.16.0.1", port: int = 40000) -> str:
        """Schedule one connection and let it go at once (so counts do not build up)."""
        conn = self.open(src, port)
        if conn is None:
            return "-"
        self.vs.release(conn, self.now)
        return name_of(conn.dest.endpoint)

    def picks(self, n: int, src: str = "172.16.0.1") -> str:
        return "".join(self.pick(src) for _ in range(n))
