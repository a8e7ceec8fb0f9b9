"""What the offload manager needs from a kernel dataplane (IPVS or nftables), and how
one is opened."""

from __future__ import annotations

from typing import Protocol

from lb.changes import Changes
from lb.model import Endpoint, Service, ServiceKey
from lb.stats import ServiceSnapshot
from offload.conntrack import Conntrack
from offload.host import IPVS_SYSCTLS, NFT_SYSCTLS, Host, HostError
from offload.ipvs import IpvsDataplane
from offload.ipvs_netlink import IpvsUnavailable, NetlinkIpvs
from offload.nft_netlink import NftNetlink
from offload.nftables import NftDataplane, NftError
from offload.policy import Mode


class KernelDataplane(Protocol):
    name: str  # "ipvs" or "nftables": what `lb list` and the metrics show
    #: True when deleting a service from the kernel would cut its connections (IPVS): it
    #: then lingers, new connections handed to the userspace listener, until they finish.
    #: False when conntrack keeps the NAT of established flows (nftables): a service
    #: leaves the kernel in one step.
    lingers: bool
    foreign: set[ServiceKey]  # keys another program already serves in this kernel path

    def not_expressible(self, s: Service) -> str | None:
        """Why this dataplane cannot carry `s`, or None."""
        ...

    async def apply(self, desired: list[Service], changes: Changes | None = None) -> None:
        """Make the kernel carry exactly these services (the others of lb's go);
        `changes`: what differs from the last apply, if the caller knows."""
        ...

    async def refresh(self) -> None:
        """Re-read counters and connection counts."""
        ...

    async def owned(self) -> set[ServiceKey]:
        """lb's services in the kernel now, whatever this process applied."""
        ...

    def has(self, key: ServiceKey) -> bool: ...

    def drained(self, key: ServiceKey, keep: Endpoint | None = None) -> bool:
        """No connection through the kernel that can still carry data (but to `keep`)."""
        ...

    def observe(self, only: ServiceKey | None = None) -> list[ServiceSnapshot]: ...

    def active(self) -> list[ServiceSnapshot]:
        """The services whose counters may have moved since the last call (for rates)."""
        ...

    async def remove_all(self) -> None: ...


class KernelUnavailable(Exception):
    pass


async def open_ipvs(device: str, drain_timeout: float) -> tuple[KernelDataplane, Host]:
    """IPVS through netlink, with its device, sysctls and masquerade table."""
    host = Host(device, sysctls=IPVS_SYSCTLS)
    await host.load_modules()
    try:
        client = await NetlinkIpvs().open()
    except IpvsUnavailable as e:
        raise KernelUnavailable(str(e)) from None
    try:
        await host.setup()
    except HostError as e:
        await client.close()
        raise KernelUnavailable(str(e)) from None
    ipvs = IpvsDataplane(client, host.vips, drain_timeout, hold=host.hold, nat=host.set_nat)
    return ipvs, host


async def open_nftables(device: str) -> tuple[KernelDataplane, Host]:
    """Table `ip lb` through `nft`, conntrack through netlink, the VIPs on the device."""
    host = Host(device, sysctls=NFT_SYSCTLS)
    await host.load_modules()
    try:
        nft = NftDataplane(conntrack=Conntrack(), netlink=NftNetlink())
        await nft.probe()
        await host.setup()
    except (NftError, HostError, OSError) as e:
        raise KernelUnavailable(str(e)) from None
    return nft, host


async def open_kernel(
    mode: Mode, device: str, drain_timeout: float
) -> tuple[KernelDataplane, Host]:
    """The kernel dataplane `mode` asks for; `auto`: IPVS if this kernel has it, else
    nftables. KernelUnavailable says why none could be opened."""
    errors = []
    if mode in (Mode.IPVS, Mode.AUTO):
        try:
            return await open_ipvs(device, drain_timeout)
        except KernelUnavailable as e:
            errors.append(f"IPVS: {e}")
    if mode in (Mode.NFTABLES, Mode.AUTO):
        try:
            return await open_nftables(device)
        except KernelUnavailable as e:
            errors.append(f"nftables: {e}")
    raise KernelUnavailable("; ".join(errors) or f"no kernel dataplane in mode {mode}")
