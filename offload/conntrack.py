"""The kernel's connection tracking table, as the nftables dataplane needs it: which NATed
flows each backend carries (for active/inactive counts), and forgetting the UDP flows of a
backend that is gone (without it, a client keeps sending into a dead backend until its
conntrack entry times out: UDP has no connection to reset).

pyroute2's conntrack socket, on the netlink thread (offload/nlthread.py).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from lb.model import Endpoint, Protocol, ServiceKey
from offload.nlthread import NetlinkThread

IPS_DST_NAT = 1 << 5  # the entry's destination was rewritten (nf_conntrack_common.h)
PROTOCOLS = {socket.IPPROTO_TCP: Protocol.TCP, socket.IPPROTO_UDP: Protocol.UDP}


@dataclass(frozen=True, slots=True)
class Flow:
    """One DNATed flow: the service it was addressed to, the backend it went to."""

    key: ServiceKey
    backend: Endpoint
    established: bool  # TCP ESTABLISHED (IPVS's "active"); anything else is inactive


class ConntrackError(Exception):
    pass


class Conntrack:
    def __init__(self) -> None:
        self._nl = NetlinkThread.shared()

    async def flows(self) -> list[Flow]:
        """Every DNATed TCP and UDP flow of this network namespace."""
        return await self._nl.run(self._flows())

    async def _flows(self) -> list[Flow]:
        from pyroute2.conntrack import AsyncConntrack

        out = []
        ct = AsyncConntrack()
        try:
            async for e in await ct.dump_entries():
                proto = PROTOCOLS.get(e.tuple_orig.proto)
                if proto is None or not (e.status or 0) & IPS_DST_NAT:
                    continue
                o, r = e.tuple_orig, e.tuple_reply
                key = ServiceKey(proto, Endpoint(ipaddress.ip_address(o.daddr), o.dport))
                state = e.protoinfo.state_name() if e.protoinfo is not None else None
                out.append(
                    Flow(
                        key,
                        Endpoint(ipaddress.ip_address(r.saddr), r.sport),
                        state == "ESTABLISHED",
                    )
                )
        except Exception as e:
            raise ConntrackError(f"cannot read the conntrack table: {e}") from None
        finally:
            ct.close()
        return out

    async def forget(self, key: ServiceKey, backends: Iterable[Endpoint]) -> int:
        """Delete the flows to `key` that were sent to these backends; how many."""
        return await self._nl.run(self._forget(key, frozenset(backends)))

    async def _forget(self, key: ServiceKey, backends: frozenset[Endpoint]) -> int:
        from pyroute2.conntrack import AsyncConntrack, NFCTAttrTuple

        proto = socket.IPPROTO_TCP if key.protocol is Protocol.TCP else socket.IPPROTO_UDP
        wanted = NFCTAttrTuple(proto=proto, daddr=str(key.listen.ip), dport=key.listen.port)
        ct = AsyncConntrack()
        n = 0
        try:
            doomed = [
                e
                async for e in await ct.dump_entries(tuple_orig=wanted)
                if Endpoint(ipaddress.ip_address(e.tuple_reply.saddr), e.tuple_reply.sport)
                in backends
            ]
            for e in doomed:
                try:
                    await ct.delete(e)
                    n += 1
                except Exception:  # gone meanwhile (it timed out): what we wanted
                    continue
        except Exception as e:
            raise ConntrackError(f"cannot clear conntrack entries of {key}: {e}") from None
        finally:
            ct.close()
        return n
