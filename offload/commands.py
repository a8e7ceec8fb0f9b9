"""`lb offload plan` and `lb cleanup`."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable

from lb.model import Config, Protocol, Service
from offload.host import NFT_TABLE, Host
from offload.ipvs_netlink import IpvsUnavailable, NetlinkIpvs
from offload.nft_rules import TABLES, base_script, diff_script, render
from offload.nftables import NftDataplane, NftError, hairpin
from offload.policy import kernel_service, not_expressible


def save_lines(s: Service) -> list[str]:
    """The service as `ipvsadm-save -n` would print it once offloaded (backends in the
    order they are added, the file's)."""
    k = kernel_service(s)
    proto = "-t" if s.protocol is Protocol.TCP else "-u"
    head = f"-A {proto} {s.listen} -s {k.scheduler}"
    if s.flags:
        head += " -b " + ",".join(f"{s.scheduler}-{f}" for f in sorted(s.flags))
    if s.persistence is not None:
        head += f" -p {s.persistence.timeout}"
        if s.persistence.prefix_len != s.listen.ip.max_prefixlen:
            head += f" -M {ipaddress.IPv4Network(f'0.0.0.0/{s.persistence.prefix_len}').netmask}"
    lines = [head]
    for b in s.backends:
        line = f"-a {proto} {s.listen} -r {b.address} -m -w {b.effective_weight}"
        if b.max_connections:
            line += f" -x {b.max_connections}"
        if b.resume_below:
            line += f" -y {b.resume_below}"
        lines.append(line)
    return lines


def plan(config: Config, mode: str) -> str:
    if mode == "nftables":
        return _nft_plan(config)
    out = [f"# lb offload plan for {config.source} (dataplane {mode})"]
    if mode == "userspace":
        out.append(
            "# dataplane userspace: nothing goes to the kernel; with ipvs or auto it would get:"
        )
    elif mode == "auto":
        out.append(
            "# auto: each service below moves to IPVS (nftables where the kernel has no IPVS; "
            "see --dataplane nftables) once unchanged for offload.hold_down"
        )
    return "\n".join(out + _split(config, not_expressible, save_lines))


def _nft_plan(config: Config) -> str:
    """The transaction the nftables dataplane's first apply sends for this config."""
    check = NftDataplane().not_expressible
    kernel = [s for s in config.services if check(s) is None]
    out = [f"# lb offload plan for {config.source} (dataplane nftables)"]
    out += base_script(hairpin(kernel))
    for s in kernel:
        out += diff_script(None, render(s))
    return "\n".join(out + _split(config, check, lambda s: []))


def _split(
    config: Config,
    check: Callable[[Service], str | None],
    lines: Callable[[Service], list[str]],
) -> list[str]:
    out, stays = [], []
    for s in config.services:
        reason = check(s)
        if reason is None:
            out += lines(s)
        else:
            stays.append(f"#   {s.name} ({s.protocol} {s.listen}): {reason}")
    if stays:
        out.append("# stays in userspace:")
        out += stays
    return out


async def cleanup(device: str) -> list[str]:
    """Remove every trace of the kernel dataplanes: lb's IPVS services, its nft tables, its
    device."""
    host = Host(device)
    done = []
    try:
        vips = await host.vips()
    except Exception as e:  # no such device, no netlink rights: say so, go on
        vips = set()
        done.append(f"cannot read {device}: {e}")
    if vips:
        try:
            client = await NetlinkIpvs().open()
        except IpvsUnavailable as e:
            done.append(f"IPVS: {e}")
        else:
            try:
                for k in await client.services():
                    if k.key.listen.ip in vips:
                        await client.del_service(k.key)
                        done.append(f"deleted IPVS service {k.key}")
            finally:
                await client.close()
    had_device = bool(vips) or await host.has_device()
    await host.remove()
    if had_device:
        done.append(f"deleted device {device}")
    done.append(f"deleted nftables table ip {NFT_TABLE} (if it existed)")
    try:
        await NftDataplane().remove_all()
        done.append(
            f"deleted nftables tables ip {TABLES[0]}, {TABLES[1]}..{TABLES[-1]} (if they existed)"
        )
    except NftError as e:
        done.append(f"nftables tables ip {TABLES[0]}*: {e}")
    return done


def run_cleanup(device: str) -> list[str]:
    return asyncio.run(cleanup(device))
