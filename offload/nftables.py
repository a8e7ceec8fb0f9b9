"""The nftables NAT dataplane: make table `ip lb` carry a desired set of services.

The first apply replaces the table whole (one atomic transaction: a leftover table from a
crashed run is adopted that way, and connections it had set up keep their conntrack NAT).
Every later apply sends only the objects of the services that changed
(`offload.nft_rules.diff_script`), also as one transaction: nothing is ever half applied,
and the cost of a change does not grow with the number of services. Other tables are
never touched.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable

from lb.model import Service, ServiceKey
from lb.stats import BackendSnapshot, ErrorReason, ServiceSnapshot, Totals
from offload.nft_rules import (
    TABLE,
    Names,
    NatPath,
    Rendered,
    base_script,
    diff_script,
    masq_elements,
    render,
)

Nft = Callable[[str], Awaitable[str]]


class NftError(Exception):
    pass


async def run_nft(script: str) -> str:
    """`nft -f -` (or `nft -j ...` when the script starts with -j): output, or NftError."""
    if shutil.which("nft") is None:
        raise NftError("nft is not installed (Debian package nftables)")
    args = ["nft", "-j", *script[3:].split()] if script.startswith("-j ") else ["nft", "-f", "-"]
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(None if script.startswith("-j ") else script.encode())
    if proc.returncode != 0:
        raise NftError(err.decode(errors="replace").strip() or f"nft exited {proc.returncode}")
    return out.decode()


def hairpin(services: list[Service]) -> set[NatPath]:
    """A backend reaching itself through the VIP: its reply would not come back through
    the balancer without masquerade. (Clients on this host need none here: conntrack's own
    NAT undoes the DNAT on the way back.)"""
    return {
        NatPath(b.address.ip, s.protocol, b.address)
        for s in services
        for b in s.backends
        if b.address != s.listen
    }


class NftDataplane:
    name = "nftables"

    def __init__(self, nft: Nft = run_nft) -> None:
        self.nft = nft
        self.foreign: set[ServiceKey] = set()  # nothing outside table lb is ever ours
        self.writes = 0  # transactions sent (an apply with nothing to do sends none)
        self._rendered: dict[ServiceKey, Rendered] | None = None  # None: table not built
        self._hairpin: set[NatPath] = set()
        self._desired: dict[ServiceKey, Service] = {}
        self._counters: dict[str, tuple[int, int]] = {}

    async def apply(self, desired: list[Service]) -> None:
        new = {s.key: render(s) for s in desired}
        pins = hairpin(desired)
        script: list[str] = []
        old = self._rendered
        if old is None:
            script += base_script(pins)
            old = {}
        elif pins != self._hairpin:
            script.append(f"flush set ip {TABLE} masq_paths")
            if pins:
                script.append(f"add element ip {TABLE} masq_paths {{ {masq_elements(pins)} }}")
        for key in sorted(old.keys() | new.keys(), key=str):
            script += diff_script(old.get(key), new.get(key))
        if script:
            await self.nft("\n".join(script) + "\n")
            self.writes += 1
        self._rendered = new
        self._hairpin = pins
        self._desired = {s.key: s for s in desired}

    async def refresh(self) -> None:
        """Re-read the per-backend counters (new connections and their first packets)."""
        if self._rendered is None:
            return
        out = await self.nft(f"-j list counters table ip {TABLE}")
        counters: dict[str, tuple[int, int]] = {}
        for item in json.loads(out).get("nftables", []):
            c = item.get("counter")
            if c is not None:
                counters[c["name"]] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
        self._counters = counters

    def has(self, key: ServiceKey) -> bool:
        return self._rendered is not None and key in self._rendered

    def observe(self) -> list[ServiceSnapshot]:
        out = []
        for key, s in self._desired.items():
            if not self.has(key):
                continue
            backends = []
            for b in reversed(s.backends):  # the kernel's order, as the other dataplanes
                conns, _ = self._counters.get(Names.of(key, b.address).counter, (0, 0))
                backends.append(
                    BackendSnapshot(
                        address=b.address,
                        backend=b,
                        weight=b.effective_weight,
                        active=0,
                        inactive=0,
                        persistent=0,
                        overloaded=False,
                        totals=Totals(conns, 0, 0, 0, 0, dict.fromkeys(ErrorReason, 0)),
                    )
                )
            total = sum(b.totals.conns for b in backends)
            out.append(
                ServiceSnapshot(
                    service=s,
                    dataplane=self.name,
                    listening=True,
                    open=0,
                    totals=Totals(total, 0, 0, 0, 0, dict.fromkeys(ErrorReason, 0)),
                    backends=tuple(backends),
                )
            )
        return out

    async def remove_all(self) -> None:
        """Delete table lb (shutdown, `lb cleanup`); established flows keep their NAT."""
        try:
            await self.nft(f"delete table ip {TABLE}\n")
        except NftError as e:
            if "No such file or directory" not in str(e):
                raise
        self._rendered = None
        self._desired.clear()
