"""The TCP relay: accept, schedule, connect (with retry), then copy both ways.

Built on asyncio protocols (no streams) for speed under uvloop:
- flow control: when one side's write buffer passes its high-water mark
  (`pause_writing`), reading from the other side stops until it drains, so memory per
  connection stays bounded with a slow reader;
- half-close: an EOF from one side becomes a shutdown(SHUT_WR) towards the other, which
  can still send; the connection closes when both directions are done;
- a reset (or error) on one side resets the other at once (SO_LINGER 0);
- what the client sends while its backend is being connected is held, up to HIGH_WATER,
  past which the client is not read until the backend is there (a client that sends its
  request and waits, the common case, is never paused: pausing and resuming it would cost
  an epoll registration each way); a backend that speaks first is relayed as soon as it
  does.

What a connection costs is kept to what it needs (bench/results/2026-12-08): the connect
coroutine is driven by the relay itself, not by a Task (no Task object, no registration in
asyncio's task set, no extra turn of the loop before it starts); connect timeouts are a
per-service queue in deadline order under one timer, idle timeouts a per-service wheel of
`idle_timeout / 8` slots (at most 1 s) swept by one timer, instead of a loop timer per
connection for each.

The PROXY protocol (`proxy_protocol`, `accept_proxy_protocol`; lb/proxy_header.py) is
carried by `ProxiedRelay`, made only for the services that use it: a plain relay does not
pay for it. So is `source: transparent` (lb/proxy/transparent.py) by `TransparentRelay`
(and `TransparentProxiedRelay`): it connects from the client's address.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any, cast

from lb import proxy_header
from lb.exhaustion import DESCRIPTORS
from lb.model import Endpoint, ProxyProtocol, Service
from lb.proxy import sockets, transparent
from lb.proxy.runtime import ServiceRuntime
from lb.sched import Dest
from lb.stats import Counters, ErrorReason
from lb.virtual_service import Conn

log = logging.getLogger("lb.proxy.tcp")

#: Write buffer limits per side: past HIGH the other side stops being read. HIGH_WATER
#: also bounds what is held from a client while its backend is being connected.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
_ANY_V4 = bytes(4)
#: A timer may fire this much before its time (uvloop's timers count whole milliseconds)
_EARLY = 0.001


def _factory(protocol: BackendSide) -> Callable[[], BackendSide]:
    return lambda: protocol


def _discard(backend: BackendSide) -> None:
    """Drop a backend connection that is no longer wanted, without it reporting back."""
    backend.relay = None
    if backend.transport is not None and not backend.lost:
        backend.transport.abort()


class TcpService(ServiceRuntime):
    def __init__(
        self, loop: asyncio.AbstractEventLoop, service: Service, sock: socket.socket
    ) -> None:
        super().__init__(loop, service, sock)
        self.relays: dict[Relay, None] = {}  # a set: an empty dict is 64 bytes, a set 216
        self.server: asyncio.Server | None = None
        self._drained: asyncio.Future[None] | None = None  # made by `drained()` only
        #: the relay classes for a new connection, without and with the PROXY protocol
        self.relay, self.proxied_relay = _relay_classes(service)
        # Connects under way, in deadline order (one connect_timeout for all: the order
        # they started), under one timer; `_last_deadline` the latest queued
        self._connecting: dict[Relay, float] = {}
        self._connect_timer: asyncio.TimerHandle | None = None
        self._last_deadline = 0.0
        # Established relays by idle-check slot (`_idle_period` seconds each), and the timer
        # that sweeps the slots due while there are some. Made at the first connection.
        self._idle_slots: dict[int, dict[Relay, None]] | None = None
        self._idle_period = 1.0
        self._idle_sweeper: asyncio.TimerHandle | None = None

    def update(self, service: Service) -> None:
        self.relay, self.proxied_relay = _relay_classes(service)
        idle_changed = service.idle_timeout != self.service.idle_timeout
        super().update(service)
        if idle_changed and self._idle_slots:
            self._rebuild_idle_slots()

    @property
    def open(self) -> int:
        return len(self.relays)

    def transparent_open(self) -> bool:
        """Whether a connection made from a client's address is still open (its replies
        need the policy routing of lb/proxy/transparent.py)."""
        return any(relay.transparent for relay in self.relays)

    async def start(self) -> None:
        self.server = await self.loop.create_server(lambda: ClientSide(self), sock=self.sock)
        self.listening = True

    def stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()
        self.listening = False

    def abort_all(self) -> None:
        for relay in list(self.relays):
            relay.reset()

    def admit(self, client: ClientSide, transport: asyncio.Transport) -> None:
        """A client connected: refuse it over the limit, else start its relay."""
        self.wake(self)
        if self.service.allowed_sources:
            peer = transport.get_extra_info("peername")
            if not peer or not self.allows(peer[0]):
                self.refused(ErrorReason.SOURCE)
                sockets.reset(transport)
                return
        limit = self.service.max_connections
        if limit and len(self.relays) >= limit:
            self.refused(ErrorReason.LIMIT)
            sockets.reset(transport)
            return
        if self.over_budget(2, f"a connection to {self.service.name}"):  # client and backend
            sockets.reset(transport)
            return
        service = self.service
        if service.accept_proxy_protocol or service.proxy_protocol is not None:
            self._admit_proxied(client, transport)
            return
        relay = self.relay(self, client, transport)
        self.relays[relay] = None
        relay.start_connect()

    def _admit_proxied(self, client: ClientSide, transport: asyncio.Transport) -> None:
        relay = self.proxied_relay(self, client, transport)
        self.relays[relay] = None
        if self.service.accept_proxy_protocol:  # read the header first, then connect
            relay.await_header(self.service.connect_timeout)
        else:
            relay.start_connect()

    # --- connect timeouts: one queue in deadline order, one timer ------------------------

    def watch_connect(self, relay: Relay) -> None:
        """Time `relay`'s connect attempt out after the service's connect_timeout."""
        deadline = self.loop.time() + self.service.connect_timeout
        queue = self._connecting
        if queue and deadline < self._last_deadline:
            # connect_timeout was lowered while older connects run: out of the queue's
            # order, this one gets a timer of its own
            relay.connect_timer = self.loop.call_at(deadline, relay.connect_timed_out)
            return
        queue[relay] = self._last_deadline = deadline
        if self._connect_timer is None:
            self._connect_timer = self.loop.call_at(deadline, self._connects_due)

    def unwatch_connect(self, relay: Relay) -> None:
        if relay.connect_timer is not None:
            relay.connect_timer.cancel()
            relay.connect_timer = None
        else:  # the timer stays: when it fires it finds the next one due, or none
            self._connecting.pop(relay, None)

    def _connects_due(self) -> None:
        self._connect_timer = None
        queue = self._connecting
        now = self.loop.time() + _EARLY
        while queue:
            relay, deadline = next(iter(queue.items()))
            if deadline > now:
                self._connect_timer = self.loop.call_at(deadline, self._connects_due)
                return
            del queue[relay]
            relay.connect_timed_out()

    # --- idle timeouts: a wheel of slots swept by one timer ------------------------------

    def watch_idle(self, relay: Relay) -> None:
        """Check `relay` for idleness once idle_timeout has passed since its last activity
        (in the slot after that moment: at most `_idle_period` late)."""
        slots = self._idle_slots
        if slots is None:
            slots = self._idle_slots = {}
            self._idle_period = _idle_period(self.service.idle_timeout)
        slot = int((relay.last + self.service.idle_timeout) / self._idle_period) + 1
        members = slots.get(slot)
        if members is None:
            members = slots[slot] = {}
        members[relay] = None
        relay.idle_slot = slot
        if self._idle_sweeper is None:
            self._arm_idle_sweeper()

    def _arm_idle_sweeper(self) -> None:
        """At the next slot's start: a relay is found idle at most a slot late."""
        period = self._idle_period
        at = (int(self.loop.time() / period) + 1) * period
        self._idle_sweeper = self.loop.call_at(at, self._sweep_idle)

    def unwatch_idle(self, relay: Relay) -> None:
        slot, slots = relay.idle_slot, self._idle_slots
        if slot is None or slots is None:
            return
        relay.idle_slot = None
        members = slots.get(slot)
        if members is not None:
            members.pop(relay, None)
            if not members:
                del slots[slot]  # the sweeper stays: when it runs it finds nothing to do

    def _sweep_idle(self) -> None:
        self._idle_sweeper = None
        slots = self._idle_slots
        if not slots:
            return
        now = self.loop.time()
        due = int((now + _EARLY) / self._idle_period)
        timeout = self.service.idle_timeout
        for slot in [k for k in slots if k <= due]:
            for relay in slots.pop(slot):
                relay.idle_slot = None
                if relay.finished:
                    continue
                if now + _EARLY >= relay.last + timeout:
                    relay.idle_close()
                else:
                    self.watch_idle(relay)
        if slots and self._idle_sweeper is None:
            self._arm_idle_sweeper()

    def _rebuild_idle_slots(self) -> None:
        """idle_timeout changed: every established relay goes into the new wheel."""
        assert self._idle_slots is not None
        relays = [r for members in self._idle_slots.values() for r in members]
        self._idle_slots = None
        if self._idle_sweeper is not None:
            self._idle_sweeper.cancel()
            self._idle_sweeper = None
        for relay in relays:
            relay.idle_slot = None
            self.watch_idle(relay)

    def forget(self, relay: Relay) -> None:
        if relay in self.relays:
            del self.relays[relay]
            DESCRIPTORS.give(2)
        if not self.relays and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drained(self) -> None:
        """Wait until the service has no connection left (shutdown's grace)."""
        if not self.relays:
            return
        if self._drained is None or self._drained.done():
            self._drained = self.loop.create_future()
        await asyncio.shield(self._drained)


class _Side(asyncio.Protocol):
    """One socket of a relay; the peer is the other socket."""

    __slots__ = ("counters", "eof", "lost", "peer", "relay", "transport")

    def __init__(self) -> None:
        self.relay: Relay | None = None
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def eof_received(self) -> bool:
        return self.relay.on_eof(self) if self.relay else False

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.pause_reading()
        if self.relay is not None:  # a slow reader is still activity while it drains
            self.relay.last = self.relay.loop.time()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.resume_reading()
        if self.relay is not None:
            self.relay.last = self.relay.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.relay is not None:
            self.relay.on_lost(self, exc)


class ClientSide(_Side):
    __slots__ = ("svc",)

    def __init__(self, svc: TcpService) -> None:
        super().__init__()
        self.svc = svc

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.svc.admit(self, self.transport)

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        assert relay is not None
        backend = relay.backend
        if backend is None:  # still connecting: held, and not read past HIGH_WATER
            if relay.proxied and relay.take_header(data):
                return
            relay.early.append(data)
            relay.held += len(data)
            if relay.held > HIGH_WATER:
                relay.client_transport.pause_reading()
            return
        assert backend.transport is not None
        backend.transport.write(data)
        n = len(data)
        relay.svc_counters.bytes_in += n
        relay.counters.bytes_in += n
        relay.bytes_in += n
        relay.last = relay.loop.time()


class BackendSide(_Side):
    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        assert relay is not None and relay.client.transport is not None
        relay.client.transport.write(data)
        n = len(data)
        relay.svc_counters.bytes_out += n
        relay.counters.bytes_out += n
        relay.bytes_out += n
        relay.last = relay.loop.time()


class Relay:
    """One proxied connection: client side, backend side, and its scheduling record."""

    #: a ProxiedRelay (a class attribute: nothing to set per connection)
    proxied = False
    #: connect from the client's address (`source: transparent`)
    transparent = False
    #: connect() asks client_address() for the client's address (proxied or transparent)
    addressed = False

    __slots__ = (
        "backend",
        "bytes_in",
        "bytes_out",
        "client",
        "client_transport",
        "conn",
        "connect_timer",
        "coro",
        "counters",
        "early",
        "established",
        "finished",
        "held",
        "idle_slot",
        "last",
        "loop",
        "must_cancel",
        "reset_seen",
        "started",
        "svc",
        "svc_counters",
        "timed_out",
        "waiting",
    )

    def __init__(self, svc: TcpService, client: ClientSide, transport: asyncio.Transport) -> None:
        self.svc = svc
        self.loop = svc.loop
        self.client = client
        client.relay = self
        self.client_transport = transport
        self.backend: BackendSide | None = None
        self.conn: Conn | None = None
        self.counters: Counters = svc.counters  # the backend's, once scheduled
        self.svc_counters = svc.counters
        self.established = False
        self.early: list[bytes] = []  # client data read before the backend was connected
        self.held = 0  # its bytes
        self.finished = False
        self.reset_seen = False
        self.idle_slot: int | None = None  # in the service's idle wheel (established)
        #: the connect coroutine while it runs (driven by `_step`, not by a Task), and the
        #: future it waits for
        self.coro: Coroutine[Any, Any, None] | None = None
        self.waiting: asyncio.Future[Any] | None = None
        self.must_cancel = False  # cancelled once what it waited for was already done
        #: a connect timer of its own, when out of the service's queue's order
        self.connect_timer: asyncio.TimerHandle | None = None
        self.timed_out = False  # the connect timer cancelled the connect
        self.last = self.started = self.loop.time()
        self.bytes_in = self.bytes_out = 0

    # --- the connect coroutine, without a Task -------------------------------------------

    def start_connect(self) -> None:
        """Run `connect()` now, up to its first wait (a Task would start it a turn of the
        loop later, and cost an object and a registration in asyncio's set of tasks)."""
        self.coro = self.connect()
        self._step()

    def _step(self, _: object = None) -> None:
        """Resume the connect coroutine (also the done-callback of what it waits for:
        `await` on a future takes its result or raises its exception itself)."""
        coro = self.coro
        if coro is None:
            return
        self.waiting = None
        try:
            if self.must_cancel:
                self.must_cancel = False
                fut = coro.throw(asyncio.CancelledError())
            else:
                fut = coro.send(None)
        except StopIteration:
            self.coro = None
            return
        except asyncio.CancelledError:  # cancelled with nothing left to do
            self.coro = None
            return
        except Exception as e:  # a bug: said, and the connection ends, as a Task would
            self.coro = None
            self.loop.call_exception_handler(
                {"message": "lb: a connect failed unexpectedly", "exception": e}
            )
            if not self.client.lost:
                sockets.reset(self.client_transport)
            self._finish()
            return
        if fut is None:  # a bare yield: again at the next turn of the loop
            self.loop.call_soon(self._step)
            return
        fut._asyncio_future_blocking = False
        self.waiting = fut
        fut.add_done_callback(self._step)

    def cancel_connect(self) -> bool:
        """Cancel the connect where it waits: it sees CancelledError there, as with
        Task.cancel (also when what it waited for is done but it has not run since).
        False if no connect is under way."""
        if self.coro is None:
            return False
        fut = self.waiting
        if fut is None or not fut.cancel():
            self.must_cancel = True
        return True

    @property
    def connecting(self) -> bool:
        return self.coro is not None

    # --- connecting ----------------------------------------------------------------------

    async def connect(self) -> None:
        svc = self.svc
        core = svc.core
        client_ip, client_port = _ANY_V4, 0
        if self.addressed:
            client_ip, client_port = self.client_address()
        elif core.needs_client_address:  # else not asked for: uvloop formats it each time
            peer = self.client_transport.get_extra_info("peername")
            if peer:
                family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
                client_ip, client_port = socket.inet_pton(family, peer[0]), peer[1]
        tried: list[Dest] = []
        reason = ErrorReason.NO_BACKEND
        for _ in range(svc.service.retries + 1):
            conn = core.connect(client_ip, client_port, self.loop.time(), tried)
            if conn is None:
                if not tried:
                    reason = ErrorReason.LIMIT if core.at_limit() else ErrorReason.NO_BACKEND
                break
            self.conn = conn
            counters = svc.counters_for(conn.dest)
            counters.conns += 1
            backend = BackendSide()
            backend.relay = self
            svc.watch_connect(self)  # not asyncio.timeout(): no object per connection
            try:
                if self.transparent:
                    await self._connect_from(client_ip, backend, conn.dest.addr)
                else:
                    await self.loop.create_connection(_factory(backend), *conn.dest.addr)
            except ConnectionRefusedError:
                reason = ErrorReason.REFUSED
            except OSError as e:
                exhausted = svc.exhausted(e, f"a connection to {svc.service.name}")
                reason = ErrorReason.EXHAUSTED if exhausted else ErrorReason.CONNECT_FAILED
            except asyncio.CancelledError:
                _discard(backend)  # the connect may have completed just as it was cancelled
                timed_out, self.timed_out = self.timed_out, False
                if timed_out and not self.client.lost:
                    reason = ErrorReason.TIMEOUT
                else:  # the client went away while we were connecting
                    svc.unwatch_connect(self)
                    core.release(conn, self.loop.time())
                    self.conn = None
                    self._finish()
                    raise
            else:
                svc.unwatch_connect(self)
                if self.client.lost:  # gone while the connect completed
                    assert backend.transport is not None
                    backend.transport.close()
                    core.release(conn, self.loop.time())
                    self.conn = None
                    self._finish()
                    return
                self._established(backend, counters)
                return
            svc.unwatch_connect(self)
            if reason is not ErrorReason.EXHAUSTED:  # lb's own shortage is not the backend's
                svc.failed(conn.dest, counters, reason)
            core.release(conn, self.loop.time())
            self.conn = None
            if reason is ErrorReason.EXHAUSTED:
                break  # no other backend would do better
            tried.append(conn.dest)
        svc.refused(reason)
        if not self.client.lost:
            sockets.reset(self.client_transport)
        self._finish(refused=reason)

    def client_address(self) -> tuple[bytes, int]:
        """The client's packed address and port, for scheduling and a transparent
        connect (a ProxiedRelay's, a TransparentRelay's)."""
        raise NotImplementedError

    async def _connect_from(
        self, source: bytes, backend: BackendSide, addr: tuple[str, int]
    ) -> None:
        """Connect to `addr` from the packed address `source` (the client's), the port
        the kernel's pick (`source: transparent`)."""
        family = socket.AF_INET6 if len(source) == 16 else socket.AF_INET
        sock = transparent.connect_socket(family, socket.inet_ntop(family, source))
        try:
            await transparent.connect(self.loop, sock, addr)
        except BaseException:
            sock.close()
            raise
        # on failure (or cancellation) this closes the socket itself
        await self.loop.create_connection(_factory(backend), sock=sock)

    def take_header(self, data: bytes) -> bool:
        """A ProxiedRelay's: whether `data` went to the PROXY header being read."""
        return False

    def connect_timed_out(self) -> None:
        self.connect_timer = None
        self.timed_out = True
        if not self.cancel_connect():
            self.timed_out = False

    def _established(self, backend: BackendSide, counters: Counters) -> None:
        self.backend = backend
        self.counters = counters
        self.client.peer = backend
        backend.peer = self.client
        self.established = True
        self.svc_counters.conns += 1
        self.last = self.loop.time()
        self.svc.watch_idle(self)
        assert backend.transport is not None
        early = self.early
        if early:
            n = self.held
            if len(early) == 1:
                backend.transport.write(early[0])
            else:
                backend.transport.writelines(early)
            self.early = []
            self.held = 0
            self.svc_counters.bytes_in += n
            counters.bytes_in += n
            self.bytes_in += n
        if self.client.eof:
            backend.transport.write_eof()
        else:
            self.client_transport.resume_reading()

    # --- relaying ------------------------------------------------------------------------

    def on_eof(self, side: _Side) -> bool:
        side.eof = True
        if not self.established:
            if self.coro is None:  # a ProxiedRelay: the client ended before its header
                self._header_failed()
            return True  # the client finished early: passed on once the backend is there
        peer = side.peer
        if peer is None or peer.transport is None or peer.lost:
            return False
        if peer.eof:  # both directions are done
            side_transport = side.transport
            assert side_transport is not None
            peer.transport.close()
            side_transport.close()
            return True
        try:
            peer.transport.write_eof()
        except (OSError, RuntimeError):
            pass
        return True  # keep our side open: the other direction goes on

    def on_lost(self, side: _Side, exc: Exception | None) -> None:
        if exc is not None:
            self.reset_seen = True
        peer = side.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            if exc is not None:
                sockets.reset(peer.transport)
            else:
                peer.transport.close()
        if side is self.client and not self.established:
            if self.coro is None:  # a ProxiedRelay still reading the client's header
                self._header_failed()
            else:
                self.cancel_connect()
            return
        if self.client.lost and (self.backend is None or self.backend.lost):
            self._finish()

    def reset(self) -> None:
        """Abort both sides with a RST (shutdown grace ran out)."""
        for side in (self.client, self.backend):
            if side is not None and side.transport is not None and not side.lost:
                sockets.reset(side.transport)
        self.cancel_connect()

    # --- idle timeout --------------------------------------------------------------------

    def idle_close(self) -> None:
        """Idle for idle_timeout (the service's sweep found it so)."""
        # Idle: close both ways. A side that still holds unsent data has a reader that
        # stopped reading; it would never flush, so it is reset instead.
        stuck = any(
            s is not None and s.transport is not None and s.transport.get_write_buffer_size()
            for s in (self.client, self.backend)
        )
        for side in (self.client, self.backend):
            if side is not None and side.transport is not None and not side.lost:
                if stuck:
                    sockets.reset(side.transport)
                else:
                    side.transport.close()

    def _finish(self, refused: ErrorReason | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.idle_slot is not None:
            self.svc.unwatch_idle(self)
        now = self.loop.time()
        backend = None
        if self.conn is not None:
            backend = self.conn.dest.endpoint
            if self.established:
                self.svc.core.close(self.conn, now, reset=self.reset_seen)
                if self.reset_seen:
                    self.counters.resets += 1
                    self.svc_counters.resets += 1
            else:
                self.svc.core.release(self.conn, now)
            self.conn = None
        self.svc.forget(self)
        if self.svc.service.access_log:
            self._log_access(now, backend, refused)

    def _header_failed(self) -> None:
        """A ProxiedRelay's: no valid PROXY header from the client."""

    def _log_access(
        self, now: float, backend: Endpoint | None, refused: ErrorReason | None
    ) -> None:
        if refused is not None:
            end = refused.value
        elif not self.established:
            end = "client_gone"
        else:
            end = "reset" if self.reset_seen else "closed"
        peer = self.client_transport.get_extra_info("peername")
        self.svc.access(
            peer,
            backend,
            end,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            seconds=now - self.started,
        )


def _packed(address: object) -> tuple[bytes, int] | None:
    """A socket address from uvloop (`peername`, `sockname`) packed, or None."""
    if not isinstance(address, tuple) or len(address) < 2:
        return None
    host = str(address[0]).partition("%")[0]  # no scope id: the header has none
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.inet_pton(family, host), int(address[1])
    except (OSError, ValueError):
        return None


class TransparentRelay(Relay):
    """A relay of a service with `source: transparent`: it connects to the backend from
    the client's address (the socket's peer)."""

    __slots__ = ()

    transparent = True
    addressed = True

    def client_address(self) -> tuple[bytes, int]:
        peer = _packed(self.client_transport.get_extra_info("peername"))
        return peer if peer is not None else (_ANY_V4, 0)


class ProxiedRelay(Relay):
    """A relay of a service with the PROXY protocol: it may read a header from the client
    before connecting (`accept_proxy_protocol`), takes the client's address from it, and
    may send one to the backend before the client's first byte (`proxy_protocol`)."""

    __slots__ = ("dest", "header", "header_timer", "send", "source")

    proxied = True
    addressed = True

    def __init__(self, svc: TcpService, client: ClientSide, transport: asyncio.Transport) -> None:
        super().__init__(svc, client, transport)
        self.send: ProxyProtocol | None = svc.service.proxy_protocol  # as admitted
        self.header: bytes | None = None  # the client's header so far, while it is read
        self.header_timer: asyncio.TimerHandle | None = None
        #: the connection as the header said (else None: the socket's own addresses)
        self.source: tuple[bytes, int] | None = None
        self.dest: tuple[bytes, int] | None = None

    # --- accepting a header --------------------------------------------------------------

    def await_header(self, timeout: float) -> None:
        """Read the client's header (within `timeout`: the service's connect_timeout)
        before connecting; the client stays readable until then."""
        self.header = b""
        self.header_timer = self.loop.call_later(timeout, self._header_failed)

    def take_header(self, data: bytes) -> bool:
        if self.header is None:
            return False
        data = self.header + data
        try:
            parsed = proxy_header.parse(data)
        except proxy_header.ProxyHeaderError as e:
            self._header_failed(str(e))
            return True
        if parsed is None:
            self.header = data
            return True
        self.header = None
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        if parsed.source is not None:
            self.source, self.dest = parsed.source, parsed.dest
        rest = data[parsed.length :]
        if rest:  # the client's first bytes: the backend gets them once connected
            self.early.append(rest)
            self.held += len(rest)
        self.start_connect()
        return True

    def _header_failed(self, why: str = "") -> None:
        """No valid header (malformed, the client left or went quiet): reset, count."""
        if self.finished or self.header is None:
            return
        self.header = None
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        log.debug("service %s: PROXY header refused: %s", self.svc.service.name, why or "none")
        self.svc.refused(ErrorReason.PROXY)
        if not self.client.lost:
            sockets.reset(self.client_transport)
        self._finish(refused=ErrorReason.PROXY)

    # --- the addresses -------------------------------------------------------------------

    def client_address(self) -> tuple[bytes, int]:
        if self.source is None:
            peer = _packed(self.client_transport.get_extra_info("peername"))
            if peer is None:
                return _ANY_V4, 0
            self.source = peer
            self.dest = _packed(self.client_transport.get_extra_info("sockname"))
        return self.source

    def _established(self, backend: BackendSide, counters: Counters) -> None:
        if self.send is not None:  # the header first, in one write with any early data
            version = 1 if self.send is ProxyProtocol.V1 else 2
            header = proxy_header.encode(version, self.source, self.dest)
            assert backend.transport is not None
            if self.early:
                n = self.held
                backend.transport.writelines([header, *self.early])
                self.early = []
                self.held = 0
                self.svc_counters.bytes_in += n
                counters.bytes_in += n
                self.bytes_in += n
            else:
                backend.transport.write(header)
        super()._established(backend, counters)

    # --- ending --------------------------------------------------------------------------

    def reset(self) -> None:
        if self.header is not None:  # shutting down while a header is read: not an error
            self.header = None
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None
            super().reset()
            self._finish()
            return
        super().reset()

    def _log_access(
        self, now: float, backend: Endpoint | None, refused: ErrorReason | None
    ) -> None:
        if self.source is None:
            super()._log_access(now, backend, refused)
            return
        # the client as the header (or the socket) said
        ip, port = self.source
        host = socket.inet_ntop(socket.AF_INET6 if len(ip) == 16 else socket.AF_INET, ip)
        end = refused.value if refused is not None else None
        if end is None:
            end = ("reset" if self.reset_seen else "closed") if self.established else "client_gone"
        self.svc.access(
            (host, port),
            backend,
            end,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            seconds=now - self.started,
        )


class TransparentProxiedRelay(ProxiedRelay):
    """A ProxiedRelay with `source: transparent`: it connects from the client's address
    as the header said (with `accept_proxy_protocol`), as HAProxy's `usesrc clientip`
    behind `accept-proxy` does, else the socket's peer. A header of the other family than
    the backend's (which is the listener's: lb.config checks it) cannot be a source: the
    connection's own address is."""

    __slots__ = ()

    transparent = True

    async def _connect_from(
        self, source: bytes, backend: BackendSide, addr: tuple[str, int]
    ) -> None:
        if (len(source) == 16) != (":" in addr[0]):
            peer = _packed(self.client_transport.get_extra_info("peername"))
            source = peer[0] if peer is not None else _ANY_V4
        await super()._connect_from(source, backend, addr)


def _idle_period(timeout: float) -> float:
    """The idle wheel's slot: an eighth of the timeout, between 50 ms and 1 s."""
    return max(0.05, min(1.0, timeout / 8))


def _relay_classes(service: Service) -> tuple[type[Relay], type[ProxiedRelay]]:
    if transparent.is_transparent(service):
        return TransparentRelay, TransparentProxiedRelay
    return Relay, ProxiedRelay
