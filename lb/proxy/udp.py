"""The UDP relay: per-client flows over connected backend sockets.

A datagram from a new client address:port is scheduled once; the flow gets its own
socket connected to the chosen backend, and replies from it go back to the client from
the service's own socket (so from the VIP). A flow ends after `idle_timeout` without a
datagram either way (IPVS: 300 s). The flow table is bounded by `max_connections`: past
it, datagrams from new clients are dropped and counted.

Sockets are driven with add_reader and non-blocking recv/send: no transports, no
buffering (UDP drops when a socket buffer is full, and so do we, counted).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import OrderedDict
from typing import Any

from lb.exhaustion import DESCRIPTORS
from lb.model import BackendState, Service
from lb.proxy.runtime import ServiceRuntime
from lb.stats import Counters, ErrorReason
from lb.virtual_service import Conn

log = logging.getLogger("lb.proxy.udp")

MAX_DATAGRAM = 65535
BATCH = 64  # datagrams read per wakeup, so one busy socket cannot starve the loop
_ANY_V4 = bytes(4)


class Flow:
    __slots__ = ("bytes_in", "bytes_out", "client", "conn", "counters", "last", "sock", "started")

    def __init__(
        self, client: Any, sock: socket.socket, conn: Conn, counters: Counters, now: float
    ) -> None:
        self.client = client
        self.sock = sock
        self.conn = conn
        self.counters = counters
        self.last = self.started = now
        self.bytes_in = self.bytes_out = 0  # for the access log


class UdpService(ServiceRuntime):
    def __init__(
        self, loop: asyncio.AbstractEventLoop, service: Service, sock: socket.socket
    ) -> None:
        super().__init__(loop, service, sock)
        self.flows: OrderedDict[Any, Flow] = OrderedDict()
        self._family = sock.family
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def open(self) -> int:
        return len(self.flows)

    async def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._on_front)
        self.listening = True

    def update(self, service: Service) -> None:
        super().update(service)
        self._forget_flows_of_gone_backends()

    def _forget_flows_of_gone_backends(self) -> None:
        """A backend removed, DOWN or in maintenance loses its flows, as on the kernel paths
        (IPVS's expire_nodest_conn, the nftables dataplane's `conntrack -D`): a client that
        keeps sending from one address and port is scheduled again with its next datagram,
        instead of feeding a dead backend for as long as it sends (UDP has no connection to
        reset). A drained backend keeps its flows."""
        live = {
            b.address
            for b in self.service.backends
            if b.state in (BackendState.UP, BackendState.DRAIN)
        }
        gone = [c for c, flow in self.flows.items() if flow.conn.dest.endpoint not in live]
        now = self.loop.time()
        for client in gone:
            self._end(self.flows.pop(client), now, "backend_gone")

    def stop_listening(self) -> None:
        """UDP has no connections to finish: stopping closes the socket and every flow."""
        self.abort_all()

    def abort_all(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.listening = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        now = self.loop.time()
        while self.flows:
            _, flow = self.flows.popitem(last=False)
            self._end(flow, now)
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    # --- data path ---------------------------------------------------------------------

    def _on_front(self) -> None:
        sock, flows = self.sock, self.flows
        now = self.loop.time()
        packets = octets = 0  # the service's, added once per wakeup
        try:
            for _ in range(BATCH):
                try:
                    data, client = sock.recvfrom(MAX_DATAGRAM)
                except OSError:  # BlockingIOError: nothing left
                    return
                flow = flows.get(client)
                if flow is None:
                    flow = self._new_flow(client, now)
                    if flow is None:
                        continue
                elif flow.last != now:  # once per wakeup is enough: `now` is the same
                    flows.move_to_end(client)
                    flow.last = now
                try:
                    flow.sock.send(data)
                except (BlockingIOError, InterruptedError):
                    self.refused(ErrorReason.LIMIT)  # backend socket buffer full: dropped
                    continue
                except ConnectionRefusedError:  # ICMP port unreachable from an earlier one
                    self.failed(flow.conn.dest, flow.counters, ErrorReason.REFUSED)
                    continue
                except OSError:
                    self.failed(flow.conn.dest, flow.counters, ErrorReason.CONNECT_FAILED)
                    continue
                n = len(data)
                packets += 1
                octets += n
                counters = flow.counters
                counters.packets_in += 1
                counters.bytes_in += n
                flow.bytes_in += n
        finally:
            if packets:
                svc_counters = self.counters
                svc_counters.packets_in += packets
                svc_counters.bytes_in += octets

    def _new_flow(self, client: Any, now: float) -> Flow | None:
        self.wake(self)
        if self.service.allowed_sources and not self.allows(client[0]):
            self.refused(ErrorReason.SOURCE)  # the datagram is dropped
            return None
        if len(self.flows) >= self.service.max_connections:
            self.refused(ErrorReason.LIMIT)
            return None
        core = self.core
        client_ip = (
            socket.inet_pton(self._family, client[0]) if core.needs_client_address else _ANY_V4
        )
        conn = core.connect(client_ip, client[1], now)
        if conn is None:
            self.refused(ErrorReason.LIMIT if core.at_limit() else ErrorReason.NO_BACKEND)
            return None
        if self.over_budget(1, f"a new udp flow of {self.service.name}"):
            core.release(conn, now)
            return None
        counters = self.counters_for(conn.dest)
        family = socket.AF_INET if conn.dest.endpoint.family == 4 else socket.AF_INET6
        sock: socket.socket | None = None
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(conn.dest.addr)
        except OSError as e:  # out of descriptors, say: this datagram is dropped, not the loop
            if sock is not None:
                sock.close()
            DESCRIPTORS.give(1)
            core.release(conn, now)
            if self.exhausted(e, f"a new udp flow of {self.service.name}"):
                self.refused(ErrorReason.EXHAUSTED)
            else:
                self.failed(conn.dest, counters, ErrorReason.CONNECT_FAILED)
                self.refused(ErrorReason.CONNECT_FAILED)
            return None
        flow = Flow(client, sock, conn, counters, now)
        self.loop.add_reader(sock.fileno(), self._on_backend, flow)
        self.flows[client] = flow
        if self._sweeper is None:
            self._arm_sweeper()
        counters.conns += 1
        self.counters.conns += 1
        return flow

    def _on_backend(self, flow: Flow) -> None:
        front, recv, client = self.sock, flow.sock.recv, flow.client
        packets = octets = 0
        for _ in range(BATCH):
            try:
                data = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                self.failed(flow.conn.dest, flow.counters, ErrorReason.REFUSED)
                continue
            except OSError:
                break
            try:
                front.sendto(data, client)
            except OSError:
                self.refused(ErrorReason.LIMIT)
                continue
            packets += 1
            octets += len(data)
        if packets:
            svc_counters, counters = self.counters, flow.counters
            svc_counters.packets_out += packets
            svc_counters.bytes_out += octets
            counters.packets_out += packets
            counters.bytes_out += octets
            flow.bytes_out += octets
        flow.last = self.loop.time()
        if client in self.flows:
            self.flows.move_to_end(client)

    # --- expiry ------------------------------------------------------------------------

    def _arm_sweeper(self) -> None:
        """Flows expire by a timer that runs only while there are flows."""
        interval = max(0.05, min(1.0, self.service.idle_timeout / 4))
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        idle = self.service.idle_timeout
        flows = self.flows
        while flows:
            flow = next(iter(flows.values()))
            if flow.last + idle > now:
                break
            flows.popitem(last=False)
            self._end(flow, now)
        self._sweeper = None
        if flows:
            self._arm_sweeper()

    def _end(self, flow: Flow, now: float, why: str = "expired") -> None:
        self.loop.remove_reader(flow.sock.fileno())
        flow.sock.close()
        DESCRIPTORS.give(1)
        self.core.release(flow.conn, now)
        if self.service.access_log:
            self.access(
                flow.client,
                flow.conn.dest.endpoint,
                why,
                bytes_in=flow.bytes_in,
                bytes_out=flow.bytes_out,
                seconds=now - flow.started,
            )
