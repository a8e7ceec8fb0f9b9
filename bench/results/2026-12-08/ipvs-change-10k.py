"""In the kernel VM's guest: one IPVS change at 10, 1,000 and 10,000 services, side by side.

lb's own full apply of 10,000 services takes about 48 minutes in the emulated guest (0.28 s
a service of 10 backends), so the table is filled by `ipvsadm-restore` (C) with the very
lines lb's services give (offload.ipvs.save_lines), and lb's IPVS dataplane then adopts it:
its first apply dumps the kernel and finds every service as it wants it (no write). Then,
ROUNDS times and told which service changed as the offload manager tells it: one service
added, one backend of a middle service drained (weight 0), the drain undone, the added
service removed. Each step is timed alone; the sizes take turns in one guest run.

Run from the repository root in the guest (booted with bench.vm.boot, OUT its rwdir):
    python bench/results/2026-12-08/ipvs-change-10k.py OUT
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import control
from bench.stats import Summary
from lb.changes import Changes
from lb.model import IPAddress
from offload.ipvs import IpvsDataplane, save_lines
from offload.ipvs_netlink import NetlinkIpvs

SIZES = (10, 1000, 10_000)
ROUNDS = 5
STEPS = ("add_one", "edit_one", "undo_edit", "remove_one")


def clear() -> None:
    subprocess.run(["ipvsadm", "-C"], check=True)


def fill(n: int) -> float:
    """The kernel's table: exactly the first n bench services, written by ipvsadm-restore."""
    clear()
    lines = [line for s in control.services(n) for line in save_lines(s)]
    start = time.perf_counter()
    subprocess.run(["ipvsadm-restore"], input="\n".join(lines) + "\n", text=True, check=True)
    return time.perf_counter() - start


async def timed(step: Any) -> float:
    start = time.perf_counter()
    await step
    return time.perf_counter() - start


async def one_size(n: int) -> dict[str, Any]:
    base = control.services(n + 1)
    filled = fill(n)
    client = await NetlinkIpvs().open()

    async def vips() -> set[IPAddress]:
        return control._BenchVips()

    dp = IpvsDataplane(client, vips)
    adopt = await timed(dp.apply(base[:n], Changes(base[:n])))
    times: dict[str, list[float]] = {step: [] for step in STEPS}
    mid = n // 2
    drained = control.edited(base)
    for _ in range(ROUNDS):
        extra = base[n]
        times["add_one"].append(await timed(dp.apply(base, Changes([extra]))))
        times["edit_one"].append(await timed(dp.apply(drained, Changes([drained[mid]]))))
        times["undo_edit"].append(await timed(dp.apply(base, Changes([base[mid]]))))
        times["remove_one"].append(await timed(dp.apply(base[:n], Changes(removed=[extra.key]))))
    kernel = len(await client.services())
    clear()
    return {
        "services_in_kernel": kernel,
        "ipvsadm_restore_s": filled,
        "adopt_s": adopt,
        **{step: Summary.of(v).as_dict() for step, v in times.items()},
        "raw": times,
    }


def main(out: Path) -> None:
    doc: dict[str, Any] = {
        "kernel": subprocess.run(
            ["uname", "-r"], capture_output=True, text=True, check=True
        ).stdout.strip()
    }
    for n in SIZES:
        doc[str(n)] = asyncio.run(one_size(n))
        print(n, json.dumps(doc[str(n)]), flush=True)
        (out / "ipvs-change-10k.json").write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
