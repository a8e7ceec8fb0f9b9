"""Persistence templates: client-IP affinity with the kernel's renew and expire rules.

A template per (client address & netmask) of a service remembers the destination
(ip_vs_sched_persist() in ip_vs_core.c). Rules reproduced from ip_vs_conn.c:
- a new connection from the client renews the template: it expires `timeout` seconds
  after the last new connection (ip_vs_conn_put restarts the timer);
- when the timer fires while it still controls connection entries, the template is kept
  and looked at again 60 s later, and from then on its timeout *is* 60 s
  (ip_vs_conn_expire: `cp->timeout = 60*HZ`). A closed TCP connection's entry lives on
  for the TIME_WAIT (or CLOSE) period, so it holds the template that long too;
- a template is no longer valid when its destination was deleted or has weight 0
  (expire_quiescent_template=1), and is then replaced.
Time is passed in (seconds, monotonic) so the rules are unit-testable.

When a service moves between dataplanes its templates move with it (`Affinity`: the
client's network, its backend, the time it has left), so that a client keeps its backend
across the move (docs/dataplanes/ipvs.md, "What moves with a service").
"""

from __future__ import annotations

from dataclasses import dataclass

from lb.model import Endpoint, IPAddress
from lb.sched.dest import Dest

EXPIRE_LATER = 60.0


@dataclass(frozen=True, slots=True)
class Affinity:
    """A persistence template as it crosses from one dataplane to another."""

    client: IPAddress  # the client's address & the netmask (the template's key)
    backend: Endpoint
    remaining: float  # seconds until it expires if no new connection renews it


class Template:
    __slots__ = ("dest", "expires", "hold_until", "key", "n_open", "timeout")

    def __init__(self, key: int, dest: Dest, timeout: float, now: float) -> None:
        self.key = key
        self.dest = dest
        self.timeout = timeout
        self.expires = now + timeout
        # The kernel's n_control: connection entries this template controls. Open ones are
        # counted; closed ones linger until `hold_until` (the latest of their expiries).
        self.n_open = 0
        self.hold_until = 0.0

    def controls_any(self, at: float) -> bool:
        return self.n_open > 0 or self.hold_until > at

    def valid(self) -> bool:
        """ip_vs_check_template(): the destination is still linked and not quiesced."""
        return self.dest.available and self.dest.weight != 0


class Templates:
    """The templates of one service, keyed by the masked client address."""

    def __init__(self, timeout: float, prefix_len: int, address_bits: int) -> None:
        self.timeout = timeout
        shift = address_bits - prefix_len
        self.mask = ((1 << address_bits) - 1) >> shift << shift
        self._by_key: dict[int, Template] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def key(self, client: int) -> int:
        return client & self.mask

    def _advance(self, t: Template, now: float) -> bool:
        """Run the template's timer up to `now`; False if it expired."""
        while t.expires <= now:
            if t.controls_any(t.expires):
                t.timeout = EXPIRE_LATER
                t.expires += EXPIRE_LATER
            else:
                if self._by_key.get(t.key) is t:
                    del self._by_key[t.key]
                return False
        return True

    def lookup(self, key: int, now: float) -> Template | None:
        """The live template for a client, valid or not (the caller checks validity)."""
        t = self._by_key.get(key)
        if t is None or not self._advance(t, now):
            return None
        return t

    def create(self, key: int, dest: Dest, now: float) -> Template:
        t = Template(key, dest, self.timeout, now)
        self._by_key[key] = t
        return t

    def attach(self, t: Template, now: float) -> None:
        """A new connection is controlled by `t`: count it and restart the timer."""
        t.n_open += 1
        t.expires = now + t.timeout

    def detach(self, t: Template, now: float, linger: float) -> None:
        """A controlled connection ended; its entry lives on for `linger` seconds."""
        self._advance(t, now)
        t.n_open -= 1
        t.hold_until = max(t.hold_until, now + linger)

    def sweep(self, now: float) -> None:
        for t in list(self._by_key.values()):
            self._advance(t, now)

    def live(self, now: float) -> list[Template]:
        """The templates still live at `now` (their timers run up to it)."""
        return [t for t in list(self._by_key.values()) if self._advance(t, now)]

    def seed(self, key: int, dest: Dest, remaining: float, now: float) -> Template | None:
        """A template another dataplane held: `dest` for `remaining` seconds, renewed by
        `timeout` as any. One this dataplane has that controls connections wins (they
        are its own, and newer); else the seeded one replaces it."""
        t = self.lookup(key, now)
        if t is not None and t.controls_any(now):
            return None
        t = self.create(key, dest, now)
        t.expires = now + remaining
        return t

    def per_dest(self) -> dict[Dest, int]:
        """Live templates per destination (ipvsadm's PersistConn column)."""
        out: dict[Dest, int] = {}
        for t in self._by_key.values():
            out[t.dest] = out.get(t.dest, 0) + 1
        return out
