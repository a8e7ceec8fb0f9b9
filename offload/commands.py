"""`lb offload plan` and `lb cleanup`."""

from __future__ import annotations

import asyncio

from lb.model import Config, Mode
from lb.proxy import transparent
from offload.host import NFT_TABLE, Host
from offload.kernel import KERNEL_PATHS, kernel_path


def plan(config: Config, mode: Mode) -> str:
    """What `lb offload plan` prints: the kernel's part of the config, and why the rest
    stays in userspace."""
    path = kernel_path(mode)
    out = [f"# lb offload plan for {config.path} (dataplane {mode})"]
    if mode is Mode.USERSPACE:
        out.append(
            "# dataplane userspace: nothing goes to the kernel; with ipvs or auto it would get:"
        )
    elif mode is Mode.AUTO:
        out.append(
            "# auto: each service below moves to IPVS (nftables where the kernel has no IPVS; "
            "see --dataplane nftables) once unchanged for offload.hold_down"
        )
    carried, stays = [], []
    for s in config.services:
        reason = path.not_expressible(s)
        if reason is None:
            carried.append(s)
        else:
            stays.append(f"#   {s.name} ({s.protocol} {s.listen}): {reason}")
    out += path.plan(carried)
    if stays:
        out.append("# stays in userspace:")
        out += stays
    return "\n".join(out)


async def cleanup(device: str) -> list[str]:
    """Remove every trace of the kernel dataplanes: what each left (KERNEL_PATHS), then
    lb's device and its masquerade table; and the policy routing of `source: transparent`."""
    host = Host(device)
    done = []
    try:
        vips = await host.vips()
    except Exception as e:  # no such device, no netlink rights: say so, go on
        vips = set()
        done.append(f"cannot read {device}: {e}")
    for path in KERNEL_PATHS.values():
        done += await path.cleanup(vips)
    had_device = bool(vips) or await host.has_device()
    await host.remove()
    if had_device:
        done.append(f"deleted device {device}")
    done.append(f"deleted nftables table ip {NFT_TABLE} (if it existed)")
    done += await transparent.cleanup()
    return done


def run_cleanup(device: str) -> list[str]:
    return asyncio.run(cleanup(device))
