"""What dataplanes count and report.

`Counters` are bumped on the data path: plain attribute increments, no locks, no dict
rebuilding. `observe()` on every dataplane returns `ServiceSnapshot`s built from them,
the one shape the admin API, `lb list` and the metrics read, whatever the dataplane.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lb.model import Backend, Endpoint, Service


class ErrorReason(enum.StrEnum):
    REFUSED = "refused"  # the backend refused the connection (RST / ICMP port unreachable)
    CONNECT_FAILED = "connect_failed"  # any other connect error (unreachable, ...)
    TIMEOUT = "timeout"  # connect timeout
    LIMIT = "limit"  # a connection or flow limit was reached (service, or every backend's)
    NO_BACKEND = "no_backend"  # the scheduler had no usable backend

    def describe(self) -> str:
        return _DESCRIBE[self]


_DESCRIBE = {
    ErrorReason.REFUSED: "refused by the backend",
    ErrorReason.CONNECT_FAILED: "failed to connect",
    ErrorReason.TIMEOUT: "timed out connecting",
    ErrorReason.LIMIT: "over a connection limit",
    ErrorReason.NO_BACKEND: "with no usable backend",
}


class Counters:
    """Totals for a service or one of its backends."""

    __slots__ = ("bytes_in", "bytes_out", "conns", "errors", "packets_in", "packets_out")

    def __init__(self) -> None:
        self.conns = 0  # connections (TCP) or flows (UDP) scheduled
        self.bytes_in = 0  # client -> backend
        self.bytes_out = 0  # backend -> client
        self.packets_in = 0  # UDP datagrams client -> backend
        self.packets_out = 0
        self.errors: dict[ErrorReason, int] = dict.fromkeys(ErrorReason, 0)

    def error(self, reason: ErrorReason) -> None:
        self.errors[reason] += 1

    def totals(self) -> Totals:
        return Totals(
            self.conns,
            self.bytes_in,
            self.bytes_out,
            self.packets_in,
            self.packets_out,
            dict(self.errors),
        )


@dataclass(frozen=True, slots=True)
class Totals:
    """A copy of Counters at one moment."""

    conns: int
    bytes_in: int
    bytes_out: int
    packets_in: int
    packets_out: int
    errors: dict[ErrorReason, int]


@dataclass(frozen=True, slots=True)
class BackendSnapshot:
    address: Endpoint
    backend: Backend | None  # the desired backend; None: removed from the config, draining
    weight: int  # the weight the scheduler uses now (0 when not UP, or removed)
    active: int
    inactive: int
    persistent: int  # persistence templates pointing here
    overloaded: bool
    totals: Totals


@dataclass(frozen=True, slots=True)
class ServiceSnapshot:
    service: Service
    dataplane: str
    listening: bool
    open: int  # open connections (TCP) or flows (UDP)
    totals: Totals
    backends: tuple[BackendSnapshot, ...]  # in the dataplane's list order (newest first)
