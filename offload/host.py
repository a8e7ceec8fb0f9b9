"""The host set-up the kernel dataplanes own, and nothing else.

- a dummy device (default `lb0`) holding each offloaded VIP as a /32 (or /128), so that
  the userspace listener can bind it and the host answers for it; the VIPs on it are how
  lb recognises its own IPVS services, after a restart or a `kill -9` too;
- the sysctls kernel NAT needs on one host (why each: docs/dataplanes/ipvs.md);
- an nftables table of its own (`lb_ipvs`) that masquerades what the kernel path cannot
  carry otherwise: clients on this host (their source is the VIP) and hairpin traffic (a
  backend reaching itself through the VIP); and that holds back new connections to a
  VIP:port for the few netlink calls during which its IPVS service has no scheduler or no
  destination yet (IPVS would answer them with a port unreachable: a refused connection;
  a dropped SYN is sent again by the client, a second later); and that drops new
  connections to the VIP:port of a service with `allowed_sources` from clients outside
  them, before IPVS sees them (IPVS cannot filter clients itself): the filter of the
  nftables dataplane (`offload.nft_rules.firewall_base`, `firewall_ops`), in this table.
`cleanup()` removes all of it: the owned IPVS services, the device, the table.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from lb.log import emit
from lb.model import IPAddress, IPNetwork, Service, ServiceKey
from offload.nft_rules import (
    Firewall,
    NatPath,
    firewall_base,
    firewall_of,
    firewall_ops,
    key_element,
    masq_elements,
)
from offload.nlthread import NetlinkThread

log = logging.getLogger("lb.offload")
IFA_F_NODAD = 0x02  # linux/if_addr.h

NFT_SYSCTLS = {"net/ipv4/ip_forward": "1"}
IPVS_SYSCTLS = {
    **NFT_SYSCTLS,
    "net/ipv4/vs/conntrack": "1",
    "net/ipv4/vs/expire_nodest_conn": "1",
    "net/ipv4/vs/expire_quiescent_template": "1",
}
NFT_TABLE = "lb_ipvs"


class HostError(Exception):
    pass


def nat_paths(services: Iterable[Service]) -> set[NatPath]:
    """What the kernel's services need masqueraded: clients on this host (their source
    address is the VIP) and hairpin (a backend reaching itself through the VIP)."""
    return {
        NatPath(source, s.protocol, b.address)
        for s in services
        for b in s.backends
        if b.address != s.listen
        for source in (s.listen.ip, b.address.ip)
    }


async def _run(*cmd: str, stdin: str | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(stdin.encode() if stdin is not None else None)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace").strip()


class Host:
    def __init__(
        self,
        device: str = "lb0",
        proc_sys: Path = Path("/proc/sys"),
        sysctls: dict[str, str] = IPVS_SYSCTLS,
    ) -> None:
        self.device = device
        self.proc_sys = proc_sys
        self.sysctls = sysctls
        self._nl = NetlinkThread.shared()  # pyroute2 needs asyncio's own loop
        self._nat: frozenset[NatPath] | None = None  # None: the table is not built
        self._filters: dict[ServiceKey, Firewall] = {}  # in the table, as written
        self._nft_warned = False

    # --- set-up ----------------------------------------------------------------------------

    async def multicast(self) -> None:
        """Let the device carry multicast (IPVS's sync daemon listens on it)."""
        code, out = await _run("ip", "link", "set", "dev", self.device, "multicast", "on")
        if code != 0:
            raise HostError(f"cannot turn multicast on for {self.device}: {out}")

    async def load_modules(self) -> None:
        """ip_vs, nf_tables and friends; a missing module is not fatal here: the dataplane
        that needs it says so when it opens."""
        if shutil.which("modprobe"):
            for module in ("ip_vs", "dummy", "nf_tables", "nft_nat", "nft_masq", "nf_conntrack"):
                await _run("modprobe", module)

    async def setup(self) -> None:
        await self._nl.run(self._ensure_device())
        for key, value in self.sysctls.items():
            path = self.proc_sys / key
            try:
                if path.read_text().strip() != value:
                    path.write_text(value)
            except OSError as e:
                raise HostError(
                    f"cannot set sysctl {key.replace('/', '.')}={value}: {e.strerror}"
                ) from None

    async def _ensure_device(self) -> None:
        from pyroute2 import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            links = [link async for link in await ipr.link("dump", ifname=self.device)]
            if not links:
                kind = await self._create_device(ipr)
                emit(
                    log,
                    logging.INFO,
                    "offload.device",
                    f"created {self.device} ({kind})",
                    device=self.device,
                    kind=kind,
                )
            index = await self._index(ipr)
            await ipr.link("set", index=index, state="up")

    async def _create_device(self, ipr: object) -> str:
        """A dummy device; where the kernel has no dummy driver, a bridge without ports,
        which holds local addresses the same way and forwards nothing."""
        errors = []
        for kind in ("dummy", "bridge"):
            try:
                await ipr.link("add", ifname=self.device, kind=kind)  # type: ignore[attr-defined]
                return kind
            except Exception as e:
                errors.append(f"{kind}: {e}")
        raise HostError(f"cannot create the device {self.device}: {'; '.join(errors)}")

    async def _index(self, ipr: object) -> int:
        links = [link async for link in await ipr.link("dump", ifname=self.device)]  # type: ignore[attr-defined]
        if not links:
            raise HostError(f"no device {self.device}")
        return int(links[0]["index"])

    # --- VIPs --------------------------------------------------------------------------------

    async def vips(self) -> set[IPAddress]:
        """The addresses on the device: the VIPs lb owns."""
        return await self._nl.run(self._vips())

    async def _vips(self) -> set[IPAddress]:
        from pyroute2 import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            links = [link async for link in await ipr.link("dump", ifname=self.device)]
            if not links:
                return set()
            index = links[0]["index"]
            addresses = {
                ipaddress.ip_address(a.get("IFA_ADDRESS"))
                async for a in await ipr.addr("dump", index=index)
                if a.get("IFA_ADDRESS")
            }
            # The kernel gives the device an IPv6 link-local address of its own: not a VIP.
            return {ip for ip in addresses if not ip.is_link_local}

    async def local_addresses(self) -> dict[IPAddress, str]:
        """Every address of this network namespace, and the device holding it."""
        return await self._nl.run(self._local_addresses())

    async def _local_addresses(self) -> dict[IPAddress, str]:
        from pyroute2 import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            names = {link["index"]: link.get("ifname") async for link in await ipr.link("dump")}
            return {
                ipaddress.ip_address(a.get("IFA_ADDRESS")): names.get(a["index"], "?")
                async for a in await ipr.addr("dump")
                if a.get("IFA_ADDRESS")
            }

    async def set_vips(self, wanted: Iterable[IPAddress]) -> None:
        """Exactly these VIPs on the device (added before the listeners bind them)."""
        await self._nl.run(self._set_vips(set(wanted)))

    async def _set_vips(self, wanted: set[IPAddress]) -> None:
        have = await self._vips()
        if wanted != have:
            await self._change_vips(wanted - have, have - wanted)

    async def change_vips(self, add: Iterable[IPAddress], remove: Iterable[IPAddress]) -> None:
        """Add and remove these VIPs, without reading what the device has (the caller
        knows: the work is that of the change)."""
        await self._nl.run(self._change_vips(set(add), set(remove)))

    async def _change_vips(self, add: set[IPAddress], remove: set[IPAddress]) -> None:
        from pyroute2 import AsyncIPRoute

        if not add and not remove:
            return
        async with AsyncIPRoute() as ipr:
            index = await self._index(ipr)
            for ip in sorted(add, key=str):
                # IPv6: no duplicate address detection (IFA_F_NODAD), which would keep the
                # VIP "tentative" and its listener unbindable for a second or more
                flags = {"flags": IFA_F_NODAD} if ip.version == 6 else {}
                await ipr.addr(
                    "add", index=index, address=str(ip), prefixlen=ip.max_prefixlen, **flags
                )
            for ip in sorted(remove, key=str):
                await ipr.addr("del", index=index, address=str(ip), prefixlen=ip.max_prefixlen)

    # --- masquerade ----------------------------------------------------------------------

    async def set_nat(self, paths: Iterable[NatPath]) -> None:
        """Masquerade exactly these (source, backend) paths, in one atomic nft transaction
        that rebuilds the table whole. A path is a client on this host (its source is the
        VIP) or a backend reaching itself through the VIP (hairpin); matching the backend's
        address and port too keeps other packets that leave from a VIP (the userspace
        listener's replies, say) untouched."""
        wanted = frozenset(p for p in paths if p.source.version == 4)
        if self._nat == wanted:
            return
        await self._build(wanted, self._filters)

    async def _build(self, nat: frozenset[NatPath], filters: dict[ServiceKey, Firewall]) -> None:
        """The table whole, with these masquerade paths and filters: one atomic `nft -f`."""
        if not self.has_nft():
            raise HostError(
                "nft is not installed (Debian package nftables): no masquerade for local "
                "clients, no filter of allowed_sources"
            )
        elements = masq_elements(nat)
        base = "\n".join(firewall_base())
        ops = [op.nft() for key in sorted(filters) for op in firewall_ops(None, filters[key])]
        script = f"""table ip {NFT_TABLE}
delete table ip {NFT_TABLE}
table ip {NFT_TABLE} {{
    set masq_paths {{
        type ipv4_addr . ipv4_addr . inet_proto . inet_service;
        {f"elements = {{ {elements} }};" if elements else ""}
    }}
    set hold {{ type ipv4_addr . inet_proto . inet_service; }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr . ip daddr . meta l4proto . th dport @masq_paths masquerade
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ct state new ip daddr . meta l4proto . th dport @hold drop comment "being built"
    }}
{base}
}}
"""
        code, out = await _run("nft", "-f", "-", stdin=script + "".join(f"{op}\n" for op in ops))
        if code != 0:
            raise HostError(f"nft: {out}")
        self._nat = nat
        self._filters = filters

    @staticmethod
    def has_nft() -> bool:
        return shutil.which("nft") is not None

    async def set_filters(
        self, sources: Mapping[ServiceKey, Iterable[IPNetwork]], *, whole: bool = False
    ) -> None:
        """Drop new connections to these services (their VIP:port) from clients outside
        their `allowed_sources` (none: no filter), before IPVS sees them. Only their
        objects change, in one `nft -f` transaction; nothing is run when none changes.
        `whole`: these are all the filtered services (any other's filter goes). A table
        not as lb wrote it (deleted by hand) is rebuilt whole; HostError if nft refuses
        that too (the caller must not give IPVS a service whose filter is not there)."""
        wanted = {} if whole else dict(self._filters)
        for key, allowed in sources.items():
            fw = firewall_of(key, allowed, NFT_TABLE)
            if fw is None:
                wanted.pop(key, None)
            else:
                wanted[key] = fw
        if wanted == self._filters:
            return
        if self._nat is not None:
            keys = sorted(wanted.keys() | self._filters.keys())
            ops = [
                op for key in keys for op in firewall_ops(self._filters.get(key), wanted.get(key))
            ]
            code, _ = await _run("nft", "-f", "-", stdin="".join(f"{op.nft()}\n" for op in ops))
            if code == 0:
                self._filters = wanted
                return
        await self._build(self._nat or frozenset(), wanted)

    @asynccontextmanager
    async def hold(self, key: ServiceKey) -> AsyncIterator[None]:
        """Drop new connections to `key` (clients retry them) while its IPVS service is being
        created or changes scheduler. Without nft, a warning and no hold."""
        if key.listen.ip.version != 4:
            yield
            return
        element = key_element(key)
        try:
            if self._nat is None:
                await self.set_nat(())
            code, out = await _run("nft", "add", "element", "ip", NFT_TABLE, "hold", element)
            if code != 0:
                raise HostError(f"nft: {out}")
        except HostError as e:
            if not self._nft_warned:
                self._nft_warned = True
                emit(
                    log,
                    logging.WARNING,
                    "offload.hold",
                    f"cannot hold new connections while an IPVS service is built: {e}",
                )
            yield
            return
        try:
            yield
        finally:
            await _run("nft", "delete", "element", "ip", NFT_TABLE, "hold", element)

    # --- clean-up ------------------------------------------------------------------------------

    async def has_device(self) -> bool:
        return await self._nl.run(self._has_device())

    async def _has_device(self) -> bool:
        from pyroute2 import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            return bool([link async for link in await ipr.link("dump", ifname=self.device)])

    async def remove(self) -> None:
        """Delete the device and the nft table (the IPVS services go first, see cleanup)."""
        await self._nl.run(self._remove_device())
        if shutil.which("nft"):
            await _run("nft", "delete", "table", "ip", NFT_TABLE)
        self._nat = None
        self._filters = {}

    async def _remove_device(self) -> None:
        from pyroute2 import AsyncIPRoute

        async with AsyncIPRoute() as ipr:
            links = [link async for link in await ipr.link("dump", ifname=self.device)]
            if links:
                await ipr.link("del", index=links[0]["index"])
