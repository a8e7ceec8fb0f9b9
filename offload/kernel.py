"""The kernel dataplanes: what the offload manager needs from one (`KernelDataplane`), and
the one table of them (`KERNEL_PATHS`) from which they are opened, planned and cleaned up."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from lb.changes import Changes
from lb.log import emit
from lb.model import Endpoint, IPAddress, Mode, Service, ServiceKey
from lb.persist import Affinity
from lb.stats import ServiceSnapshot
from offload.conntrack import Conntrack
from offload.host import IPVS_SYSCTLS, NFT_SYSCTLS, NFT_TABLE, Host, HostError
from offload.ipvs import IpvsDataplane, save_lines
from offload.ipvs_netlink import IpvsUnavailable, NetlinkIpvs
from offload.ipvs_sync import SyncInjector
from offload.nft_netlink import NftNetlink
from offload.nft_rules import TABLES, base_script, diff_script, firewall_of, firewall_ops, render
from offload.nftables import NftDataplane, NftError, hairpin
from offload.policy import not_expressible_ipvs, not_expressible_nftables

log = logging.getLogger("lb.offload")


class KernelDataplane(Protocol):
    name: str  # "ipvs" or "nftables": what `lb list` and the metrics show
    #: True when deleting a service from the kernel would cut its connections (IPVS): it
    #: then lingers, new connections handed to the userspace listener, until they finish.
    #: False when conntrack keeps the NAT of established flows (nftables): a service
    #: leaves the kernel in one step.
    lingers: bool
    foreign: set[ServiceKey]  # keys another program already serves in this kernel path
    #: Whether persistence templates cross into and out of it (`seeds`, export_affinity):
    #: without, a persistent service moves only once it holds no template.
    carries_affinity: bool

    def not_expressible(self, s: Service) -> str | None:
        """Why this dataplane cannot carry `s`, or None."""
        ...

    async def apply(
        self,
        desired: list[Service],
        changes: Changes,
        seeds: Mapping[ServiceKey, list[Affinity]] | None = None,
    ) -> None:
        """Make the kernel carry exactly these services (the others of lb's go);
        `changes`: what differs from the last apply (lb.changes); `seeds`: the
        persistence templates of services coming from userspace, in the kernel before
        it takes their new connections (if `carries_affinity`)."""
        ...

    async def export_affinity(self, key: ServiceKey) -> list[Affinity]:
        """The service's templates in the kernel, for userspace taking it back."""
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

    def fastpath_note(self) -> str:
        """What established flows take past the kernel's NAT, in a few words (the log at
        start, `lb list`): nftables' flowtable, or why there is none."""
        ...


class KernelUnavailable(Exception):
    pass


@dataclass(frozen=True, slots=True)
class KernelPath:
    """One kernel dataplane, with all lb needs to know of it (`KERNEL_PATHS`)."""

    mode: Mode
    label: str  # how messages name it
    #: Why it cannot carry a service, or None (pure: `lb offload plan` runs it offline).
    not_expressible: Callable[[Service], str | None]
    #: Probe the kernel, set the host up (device, sysctls) and open the dataplane:
    #: (device, drain_timeout, flow_threshold) -> (dataplane, host); KernelUnavailable says
    #: why it cannot.
    open: Callable[[str, float, int], Awaitable[tuple[KernelDataplane, Host]]]
    #: Remove what a run left in this path (`lb cleanup`), given the VIPs on lb's device;
    #: what it did, one line each.
    cleanup: Callable[[set[IPAddress]], Awaitable[list[str]]]
    #: What the kernel would be given for these services (`lb offload plan`): lines.
    plan: Callable[[list[Service]], list[str]]


async def open_ipvs(
    device: str, drain_timeout: float, flow_threshold: int = 0
) -> tuple[KernelDataplane, Host]:
    """IPVS through netlink, with its device, sysctls and masquerade table
    (`flow_threshold` is not used: IPVS's flows cannot take a flowtable,
    docs/dataplanes/nftables.md)."""
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
    sync = SyncInjector(client, host)
    injector: SyncInjector | None = sync
    try:
        await sync.probe()  # can persistence templates move in?
    except Exception as e:  # an old kernel, a sync daemon of keepalived's running here
        emit(
            log,
            logging.WARNING,
            "ipvs.affinity_unavailable",
            f"IPVS sync daemon unavailable ({type(e).__name__}: {e}): a persistent service "
            "moves into IPVS only once its clients' templates have expired",
        )
        injector = None
    ipvs = IpvsDataplane(
        client,
        host.vips,
        drain_timeout,
        hold=host.hold,
        nat=host.set_nat,
        filters=host.set_filters if host.has_nft() else None,
        injector=injector,
    )
    return ipvs, host


async def cleanup_ipvs(vips: set[IPAddress]) -> list[str]:
    """Delete lb's IPVS services: those on a VIP of its device."""
    if not vips:
        return []
    try:
        client = await NetlinkIpvs().open()
    except IpvsUnavailable as e:
        return [f"IPVS: {e}"]

    async def owned_vips() -> set[IPAddress]:
        return vips

    try:
        ipvs = IpvsDataplane(client, owned_vips)
        owned = sorted(await ipvs.owned())
        await ipvs.remove_all()
    finally:
        await client.close()
    return [f"deleted IPVS service {key}" for key in owned]


def plan_ipvs(services: list[Service]) -> list[str]:
    """The services as `ipvsadm-save -n` would print them once offloaded; after a
    service with `allowed_sources`, its filter in the host's table, as nft comments."""
    out = []
    for s in services:
        out += save_lines(s)
        fw = firewall_of(s.key, s.allowed_sources, NFT_TABLE)
        out += [f"# nft: {op.nft()}" for op in firewall_ops(None, fw)]
    return out


async def open_nftables(
    device: str, drain_timeout: float = 0.0, flow_threshold: int = 0
) -> tuple[KernelDataplane, Host]:
    """Tables `ip lb*` through `nft` and netlink, conntrack through the `conntrack` tool,
    the VIPs on the device (`drain_timeout` is not used: conntrack keeps a leaving
    service's flows); with `flow_threshold`, a flowtable for established flows if the
    kernel has flowtables (else lb says so once and runs without)."""
    host = Host(device, sysctls=NFT_SYSCTLS)
    await host.load_modules()
    try:
        nft = NftDataplane(
            conntrack=Conntrack(),
            netlink=NftNetlink(),
            flow_threshold=flow_threshold,
            device=device,
        )
        await nft.probe()
        await host.setup()
    except (NftError, HostError, OSError) as e:
        raise KernelUnavailable(str(e)) from None
    return nft, host


async def cleanup_nftables(vips: set[IPAddress]) -> list[str]:
    """Delete lb's nftables tables (whatever the device holds), the flowtable with table
    `ip lb`."""
    try:
        await NftDataplane().remove_all()
    except NftError as e:
        return [f"nftables tables ip {TABLES[0]}*: {e}"]
    return [f"deleted nftables tables ip {TABLES[0]}, {TABLES[1]}..{TABLES[-1]} (if they existed)"]


def plan_nftables(services: list[Service]) -> list[str]:
    """The transaction the nftables dataplane's first apply sends for these services."""
    out = base_script(hairpin(services))
    for s in services:
        out += diff_script(None, render(s))
    return out


#: The kernel dataplanes, in the order `auto` tries them (adding one: docs/architecture.md).
KERNEL_PATHS: dict[Mode, KernelPath] = {
    p.mode: p
    for p in (
        KernelPath(Mode.IPVS, "IPVS", not_expressible_ipvs, open_ipvs, cleanup_ipvs, plan_ipvs),
        KernelPath(
            Mode.NFTABLES,
            "nftables",
            not_expressible_nftables,
            open_nftables,
            cleanup_nftables,
            plan_nftables,
        ),
    )
}


def kernel_path(mode: Mode) -> KernelPath:
    """The kernel dataplane that `mode` describes for a plan (`auto` and `userspace`: the
    first one `auto` tries)."""
    return KERNEL_PATHS.get(mode) or next(iter(KERNEL_PATHS.values()))


async def open_kernel(
    mode: Mode, device: str, drain_timeout: float, flow_threshold: int = 0
) -> tuple[KernelDataplane, Host]:
    """The kernel dataplane `mode` asks for; `auto`: the first of KERNEL_PATHS this kernel
    has. KernelUnavailable says why none could be opened."""
    errors = []
    for path in KERNEL_PATHS.values():
        if mode in (path.mode, Mode.AUTO):
            try:
                return await path.open(device, drain_timeout, flow_threshold)
            except KernelUnavailable as e:
                errors.append(f"{path.label}: {e}")
    raise KernelUnavailable("; ".join(errors) or f"no kernel dataplane in mode {mode}")
