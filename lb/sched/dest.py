"""A destination as the IPVS core sees it (`struct ip_vs_dest`): weight, thresholds, counters.

Pure state with no I/O. Connection counters follow the kernel: `active` and `inactive`
connections, and the OVERLOAD flag set and cleared from their total as
`ip_vs_bind_dest()` / `ip_vs_unbind_dest()` do in `net/netfilter/ipvs/ip_vs_conn.c`.
"""

from __future__ import annotations

from collections import deque

from lb.model import Endpoint


def fold_address(packed: bytes) -> int:
    """The 32-bit value IPVS hashes for an address: IPv4 as is, IPv6 as the XOR of its words."""
    if len(packed) == 4:
        return int.from_bytes(packed, "big")
    v = int.from_bytes(packed, "big")
    return (v ^ (v >> 32) ^ (v >> 64) ^ (v >> 96)) & 0xFFFFFFFF


class Dest:
    """One backend inside a virtual service: its kernel-visible state and live counts."""

    __slots__ = (
        "_addr",
        "_lingering",
        "active",
        "available",
        "endpoint",
        "inactive",
        "l_threshold",
        "last_weight",
        "overloaded",
        "u_threshold",
        "weight",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._addr: tuple[str, int] | None = None
        self.weight = 0
        self.last_weight = 0  # latest non-zero weight (mh keeps slots for quiesced dests)
        self.u_threshold = 0
        self.l_threshold = 0
        self.overloaded = False
        self.available = False  # IP_VS_DEST_F_AVAILABLE: linked into a service's list
        self.active = 0
        self.inactive = 0
        # Closed TCP connections stay "inactive" for the kernel's TIME_WAIT or CLOSE period.
        # Per linger period, buckets of [expiry time, count] (oldest first), at most one
        # bucket per second, so memory stays bounded whatever the connection rate.
        # None until the first connection closes: most backends of a large node never
        # linger a connection, and an empty dict each was 6 MB at 100,000 backends
        self._lingering: dict[float, deque[list[float]]] | None = None

    @property
    def fold(self) -> int:
        """The address as IPVS hashes it (mh's table, made only when dests change)."""
        return fold_address(self.endpoint.ip.packed)

    @property
    def port(self) -> int:
        return self.endpoint.port

    @property
    def addr(self) -> tuple[str, int]:
        """(host, port) for connect(): made at the first connection, then kept."""
        addr = self._addr
        if addr is None:
            addr = self._addr = self.endpoint.sockaddr()
        return addr

    def __repr__(self) -> str:
        return f"Dest({self.endpoint}, w={self.weight}, a={self.active}, i={self.inactive})"

    # --- management (ip_vs_ctl.c: __ip_vs_update_dest) ---------------------------------

    def update(self, weight: int, u_threshold: int, l_threshold: int, *, adding: bool) -> None:
        if adding or weight != 0:
            self.last_weight = weight
        self.weight = weight
        self.available = True
        if u_threshold == 0 or u_threshold > self.u_threshold:
            self.overloaded = False
        self.u_threshold = u_threshold
        self.l_threshold = l_threshold

    # --- connection accounting -----------------------------------------------------------

    @property
    def total(self) -> int:
        return self.active + self.inactive

    def overhead(self) -> int:
        """ip_vs_dest_conn_overhead(): active connections weigh 256 inactive ones."""
        return (self.active << 8) + self.inactive

    def bind(self, active: bool) -> None:
        """A new connection to this destination (ip_vs_bind_dest)."""
        if active:
            self.active += 1
        else:
            self.inactive += 1
        if self.u_threshold and self.total >= self.u_threshold:
            self.overloaded = True

    def unbind(self, active: bool) -> None:
        """A connection entry expired (ip_vs_unbind_dest)."""
        if active:
            self.active -= 1
        else:
            self.inactive -= 1
        self._maybe_clear_overload()

    def deactivate(self, now: float, linger: float) -> None:
        """An active TCP connection closed: it counts as inactive for `linger` seconds."""
        self.active -= 1
        self.inactive += 1
        expires = now + linger
        lingering = self._lingering
        if lingering is None:
            lingering = self._lingering = {}
        buckets = lingering.get(linger)
        if buckets is None:
            buckets = lingering[linger] = deque()
        if buckets and expires - buckets[-1][0] < 1.0:
            buckets[-1][0] = expires
            buckets[-1][1] += 1
        else:
            buckets.append([expires, 1])

    def next_expiry(self) -> float | None:
        if not self._lingering:
            return None
        heads = [b[0][0] for b in self._lingering.values() if b]
        return min(heads) if heads else None

    def expire(self, now: float) -> None:
        """Let lingering inactive connections whose time is up go (each is an unbind)."""
        if not self._lingering:
            return
        gone = 0
        for buckets in self._lingering.values():
            while buckets and buckets[0][0] <= now:
                gone += int(buckets.popleft()[1])
        if gone:
            self.inactive -= gone
            self._maybe_clear_overload()

    def _maybe_clear_overload(self) -> None:
        if self.l_threshold:
            if self.total < self.l_threshold:
                self.overloaded = False
        elif self.u_threshold:
            if self.total * 4 < self.u_threshold * 3:
                self.overloaded = False
        else:
            self.overloaded = False
