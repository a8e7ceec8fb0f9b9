"""The kernel's connection tracking table, as the nftables dataplane needs it: which NATed
flows each backend carries (for active/inactive counts), and forgetting the UDP flows of a
backend that is gone (without it, a client keeps sending into a dead backend until its
conntrack entry times out: UDP has no connection to reset).

Through the `conntrack` tool (Debian's conntrack), not a netlink socket parsed in Python:
the table holds an entry per connection for minutes (TIME_WAIT), tens of thousands under
a connection load, and decoding them with pyroute2 took about 100 us each, on the
balancer's CPU, longer than the interval between reads. The tool filters in C (only
DNATed entries) and prints a line per entry that is split in a few microseconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

from lb.model import Endpoint, Protocol, ServiceKey

TIMEOUT = 30.0  # a read that takes longer is given up (the counts wait for the next one)
PROTOCOLS = {"tcp": Protocol.TCP, "udp": Protocol.UDP}
_DELETED = re.compile(r"(\d+) flow entries have been deleted")


@dataclass(frozen=True, slots=True)
class Flow:
    """One DNATed flow: the service it was addressed to, the backend it went to."""

    key: ServiceKey
    backend: Endpoint
    established: bool  # TCP ESTABLISHED (IPVS's "active"); anything else is inactive


class ConntrackError(Exception):
    pass


def parse_flows(text: str) -> list[Flow]:
    """`conntrack -L` lines -> flows: the original destination (the VIP:port) and the
    reply's source (the backend). Lines of other protocols, or not NATed, are left out."""
    out = []
    seen: dict[tuple[str, str], Endpoint] = {}  # the few VIPs and backends, parsed once

    def endpoint(ip: str, port: str) -> Endpoint:
        e = seen.get((ip, port))
        if e is None:
            e = seen[(ip, port)] = Endpoint(ipaddress.ip_address(ip), int(port))
        return e

    for line in text.splitlines():
        words = line.split()
        proto = PROTOCOLS.get(words[0]) if words else None
        if proto is None:
            continue
        fields: dict[str, list[str]] = {}
        for w in words:
            name, eq, value = w.partition("=")
            if eq:
                fields.setdefault(name, []).append(value)
        try:
            vip = endpoint(fields["dst"][0], fields["dport"][0])
            backend = endpoint(fields["src"][1], fields["sport"][1])
        except (KeyError, IndexError, ValueError):
            continue
        if backend == vip:
            continue  # not DNATed
        state = words[3] if proto is Protocol.TCP and len(words) > 3 else ""
        # A flow in the flowtable (nftables' fast path) may be listed without timeout and
        # state: it is established (the flowtable lets go of a TCP flow at FIN or RST).
        offloaded = proto is Protocol.TCP and "=" in state and "[OFFLOAD]" in words
        out.append(Flow(ServiceKey(proto, vip), backend, state == "ESTABLISHED" or offloaded))
    return out


async def _conntrack(*args: str) -> tuple[int, str, str]:
    if shutil.which("conntrack") is None:
        raise ConntrackError("conntrack is not installed (Debian package conntrack)")
    proc = await asyncio.create_subprocess_exec(
        "conntrack",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ConntrackError(f"conntrack {' '.join(args)}: no answer in {TIMEOUT:g}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


class Conntrack:
    async def flows(self) -> list[Flow]:
        """Every DNATed TCP and UDP flow of this network namespace (IPv4)."""
        code, out, err = await _conntrack("-L", "-f", "ipv4", "--dst-nat")
        if code != 0:
            raise ConntrackError(f"cannot read the conntrack table: {err.strip()}")
        return parse_flows(out)

    async def forget(self, key: ServiceKey, backends: Iterable[Endpoint]) -> int:
        """Delete the flows to `key` that were sent to these backends; how many."""
        n = 0
        for b in sorted(set(backends)):
            code, _, err = await _conntrack(
                "-D",
                "-p", key.protocol.value,
                "--orig-dst", str(key.listen.ip),
                "--dport", str(key.listen.port),
                "--reply-src", str(b.ip),
                "--reply-port-src", str(b.port),
            )  # fmt: skip
            deleted = _DELETED.search(err)
            if deleted is None and code != 0:
                raise ConntrackError(f"cannot clear conntrack entries of {key}: {err.strip()}")
            n += int(deleted.group(1)) if deleted else 0
        return n
