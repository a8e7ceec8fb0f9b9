"""Persistence templates into kernel IPVS, through the kernel's own sync protocol.

IPVS has no verb to add a template, but its connection-synchronisation protocol (meant
for a standby director) creates them: a *backup* sync daemon takes version-1 sync
messages from a multicast group on one device and makes each entry a connection or a
template. lb starts that daemon on its own device, sends the service's templates to it
from the same host (multicast loop), reads /proc/net/ip_vs_conn until they are there,
and stops the daemon: it runs only while a service is handed over, because the protocol
has no authentication (any local process could steer clients while it listens).
docs/dataplanes/ipvs.md, "What moves with a service", has the message layout and the
kernel's rules (the real server must exist first; an existing template is not
re-pointed; at most 40 entries per datagram on a 1500-byte MTU).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable, Sequence

from lb.model import Endpoint, IPAddress, ServiceKey
from lb.persist import Affinity
from offload.host import Host
from offload.ipvs_model import SYNC_GROUP, SYNC_ID, KConn, sync_messages
from offload.ipvs_netlink import NetlinkIpvs, read_templates

SETTLE = 1.0  # seconds to wait for the daemon to make the templates
POLL = 0.02


class SyncInjector:
    """Writes a service's templates into IPVS (`inject`), once `probe` said it can."""

    def __init__(
        self,
        client: NetlinkIpvs,
        host: Host,
        read: Callable[[], list[KConn] | None] = read_templates,
        syncid: int = SYNC_ID,
    ) -> None:
        self.client = client
        self.host = host
        self.read = read
        self.syncid = syncid

    async def probe(self) -> None:
        """Raise (with the kernel's reason) unless a backup daemon can run on the device."""
        await self.host.multicast()
        try:
            await self.client.start_backup_daemon(self.host.device, self.syncid)
        except OSError as e:
            # One backup daemon per network namespace: one on lb's device with lb's sync
            # id was left by an lb killed in a hand-over, and is stopped; any other is not
            # lb's, and lb does without (said by the caller).
            if e.errno != errno.EEXIST:
                raise
            running = await self.client.backup_daemon()
            if running != (self.host.device, self.syncid):
                raise OSError(e.errno, f"a backup sync daemon runs here: {running}") from None
            await self.client.stop_backup_daemon()
            await self.client.start_backup_daemon(self.host.device, self.syncid)
        await self.client.stop_backup_daemon()

    async def inject(self, key: ServiceKey, templates: Sequence[Affinity]) -> int:
        """Create these templates of `key` (its real servers exist already); how many the
        kernel holds now, pointing where they should."""
        family = key.listen.family
        wanted = {
            (a.client, a.backend): a.remaining
            for a in templates
            if a.client.version == family and a.remaining > 0
        }
        if not wanted:
            return 0
        entries = [(c, b, left) for (c, b), left in wanted.items()]
        await self.client.start_backup_daemon(self.host.device, self.syncid)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                index = socket.if_nametoindex(self.host.device)
                mreqn = struct.pack("=4s4si", b"", b"", index)  # no group, any address
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
                for message in sync_messages(key, entries, self.syncid):
                    sock.sendto(message, SYNC_GROUP)
            return await self._held(key, set(wanted))
        finally:
            await self.client.stop_backup_daemon()

    async def _held(self, key: ServiceKey, wanted: set[tuple[IPAddress, Endpoint]]) -> int:
        """How many of `wanted` the kernel holds, waiting up to SETTLE for all of them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE
        while True:
            held = {
                (t.client.ip, t.dest)
                for t in self.read() or []
                if t.vip == key.listen and t.protocol is key.protocol
            }
            found = len(wanted & held)
            if found == len(wanted) or loop.time() >= deadline:
                return found
            await asyncio.sleep(POLL)
