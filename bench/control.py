"""Control plane: how long applying services takes, and how long one more change takes, as
the number of services grows.

Each kernel dataplane gets N services of 10 backends each, in a network namespace of the
bench's own, then:
- `full`: the whole set applied to an empty kernel (the first sync after a start);
- `add_one`: one more service once the N are in;
- `edit_one`: one backend of one of the N services drained (weight 0: no new connections).
The O(n) reference is kube-proxy's iptables mode, rules of the same shape (a KUBE-SERVICES
rule per service, a KUBE-SVC chain picking one of ten KUBE-SEP chains with `statistic`,
each DNATing), applied with `iptables-restore` the way it synchronises: the whole nat
table each time, so `add_one` and `edit_one` rewrite everything.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from bench.stats import Summary
from lb.changes import Changes
from lb.model import Backend, Endpoint, IPAddress, Protocol, SchedulerName, Service
from offload.ipvs import IpvsDataplane
from offload.ipvs_netlink import NetlinkIpvs
from offload.nft_netlink import NftNetlink
from offload.nft_rules import Op
from offload.nftables import NftDataplane

BACKENDS = 10
VIP_BASE = int(ipaddress.ip_address("10.100.0.0"))
BACKEND_BASE = int(ipaddress.ip_address("10.128.0.0"))
STEPS = ("full", "add_one", "edit_one")
#: The same changes, counting only the kernel transaction (lb encoding its netlink batch
#: and the kernel committing it), for the dataplanes where it is separable
KERNEL_STEPS = {"add_one": "add_one_kernel", "edit_one": "edit_one_kernel"}


def services(n: int, backends: int = BACKENDS) -> list[Service]:
    """N rr services on distinct VIPs (port 80), each with its own backends (port 8080)."""
    return [
        Service(
            f"svc{i}",
            Protocol.TCP,
            Endpoint(ipaddress.ip_address(VIP_BASE + i), 80),
            SchedulerName.RR,
            backends=tuple(
                Backend(Endpoint(ipaddress.ip_address(BACKEND_BASE + i * backends + j), 8080))
                for j in range(backends)
            ),
            retries=0,
        )
        for i in range(n)
    ]


def edited(ss: list[Service]) -> list[Service]:
    """The same services with one backend drained (weight 0), in the middle one."""
    out = list(ss)
    mid = len(out) // 2
    s = out[mid]
    out[mid] = s.with_backends((replace(s.backends[0], weight=0), *s.backends[1:]))
    return out


async def run(cmd: list[str], stdin: str | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {err.decode(errors='replace').strip()}")
    return out.decode()


@dataclass
class Netns:
    """A network namespace for one dataplane's rules, removed afterwards."""

    name: str

    async def __aenter__(self) -> Netns:
        await run(["ip", "netns", "add", self.name])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await run(["ip", "netns", "del", self.name])

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]


# --- the dataplanes under test --------------------------------------------------------------


class Applier(typing.Protocol):
    """Something that makes a kernel carry a list of services."""

    async def apply(self, ss: list[Service], changes: Changes) -> None: ...

    async def reset(self) -> None: ...

    def kernel_seconds(self) -> float | None:
        """Of the last apply, the time in the kernel transaction; None: not separable."""


class Nftables:
    """lb's nftables dataplane: the first apply through `nft -f`, changes over netlink
    (`netlink=False`: changes through `nft -f` too, lb's fallback)."""

    def __init__(self, ns: Netns, *, netlink: bool = True) -> None:
        async def nft(script: str) -> str:
            return await run(ns.cmd("nft", "-f", "-"), script)

        self.netlink = NftNetlink(ns.name) if netlink else None
        self.dp = NftDataplane(nft=nft, netlink=self.netlink)
        self._kernel: float | None = None

    async def apply(self, ss: list[Service], changes: Changes) -> None:
        self._kernel = None
        if self.netlink is None:
            await self.dp.apply(ss, changes)
            return
        commit = self.netlink.run
        spent = 0.0

        def timed_run(ops: list[Op]) -> None:
            nonlocal spent
            start = time.perf_counter()
            try:
                commit(ops)
            finally:
                spent += time.perf_counter() - start

        self.netlink.run = timed_run  # type: ignore[method-assign]
        try:
            await self.dp.apply(ss, changes)
        finally:
            del self.netlink.run
        self._kernel = spent

    async def reset(self) -> None:
        await self.dp.remove_all()

    def kernel_seconds(self) -> float | None:
        return self._kernel


def iptables_rules(ss: list[Service]) -> str:
    """kube-proxy iptables mode's nat table for these services (same shape, not its code)."""
    chains = [":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]"]
    rules = ["-A PREROUTING -j KUBE-SERVICES", "-A OUTPUT -j KUBE-SERVICES"]
    for i, s in enumerate(ss):
        svc = f"KUBE-SVC-{i}"
        chains.append(f":{svc} - [0:0]")
        rules.append(
            f"-A KUBE-SERVICES -d {s.listen.ip}/32 -p tcp -m tcp --dport {s.listen.port} -j {svc}"
        )
        live = [b for b in s.backends if b.effective_weight > 0]  # as kube-proxy drops them
        n = len(live)
        for j, b in enumerate(live):
            sep = f"KUBE-SEP-{i}-{j}"
            chains.append(f":{sep} - [0:0]")
            pick = (
                "" if j == n - 1 else f"-m statistic --mode random --probability {1 / (n - j):.5f} "
            )
            rules.append(f"-A {svc} {pick}-j {sep}")
            rules.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination {b.address}")
    return "\n".join(["*nat", *chains, *rules, "COMMIT", ""])


class IptablesRestore:
    def __init__(self, ns: Netns, command: str) -> None:
        self.ns = ns
        self.command = command

    async def apply(self, ss: list[Service], changes: Changes) -> None:
        await run(self.ns.cmd(self.command), iptables_rules(ss))  # the whole table, always

    async def reset(self) -> None:
        await run(self.ns.cmd(self.command), iptables_rules([]))

    def kernel_seconds(self) -> float | None:
        return None  # the restore command is the whole of it


class _BenchVips(set[IPAddress]):
    """Every address of the bench's VIP range (10.100.0.0/16) is lb's: an IPVS dataplane
    asks which VIPs it owns, and the bench puts none on a device."""

    def __contains__(self, ip: object) -> bool:
        return isinstance(ip, ipaddress.IPv4Address) and int(ip) >> 16 == VIP_BASE >> 16


class Ipvs:
    """lb's IPVS dataplane over netlink, told which service changed as the offload manager
    tells it. IPVS keeps its table per network namespace; the bench's runs in a kernel VM
    where nothing else uses it, so this one programs the guest's own namespace."""

    def __init__(self, ns: Netns) -> None:
        self.dp: IpvsDataplane | None = None

    async def apply(self, ss: list[Service], changes: Changes) -> None:
        if self.dp is None:
            client = await NetlinkIpvs().open()

            async def vips() -> set[IPAddress]:
                return _BenchVips()

            self.dp = IpvsDataplane(client, vips)
        await self.dp.apply(ss, changes)

    async def reset(self) -> None:
        if self.dp is not None:
            await self.dp.remove_all()

    def kernel_seconds(self) -> float | None:
        return None


APPLIERS: dict[str, Callable[[Netns], Applier]] = {
    "lb nftables": Nftables,
    "lb nftables, changes via nft -f": lambda ns: Nftables(ns, netlink=False),
    "iptables-restore (legacy)": lambda ns: IptablesRestore(ns, "iptables-legacy-restore"),
    "iptables-restore (nft)": lambda ns: IptablesRestore(ns, "iptables-nft-restore"),
}


#: Side by side in a kernel with IPVS (the vm part's guest): lb's two kernel dataplanes.
IPVS_APPLIERS: dict[str, Callable[[Netns], Applier]] = {"lb ipvs": Ipvs, "lb nftables": Nftables}


#: Sizes past which a dataplane is not measured: lb's fallback reads a 10,000-service
#: script for minutes (the reason changes go over netlink).
LARGEST = {"lb nftables, changes via nft -f": 1000}


# --- the measurement ----------------------------------------------------------------------


async def timed(step: Awaitable[None]) -> float:
    start = time.perf_counter()
    await step
    return time.perf_counter() - start


Results = dict[str, dict[int, dict[str, Summary]]]


async def measure(
    sizes: list[int],
    runs: int,
    advance: Callable[[str], None] = lambda _: None,
    appliers: dict[str, Callable[[Netns], Applier]] = APPLIERS,
) -> Results:
    """For each dataplane and size: `runs` fresh full applies, each followed by one more
    service and by one edit. The dataplanes take turns at each size (same conditions)."""
    results: Results = {name: {} for name in appliers}
    for n in sizes:
        base = services(n + 1)
        for i, (name, make) in enumerate(appliers.items()):
            if n > LARGEST.get(name, n):
                advance(f"{name} skipped at {n} services")
                continue
            times: dict[str, list[float]] = {step: [] for step in STEPS}
            async with Netns(f"lbbench-control-{i}") as ns:
                applier = make(ns)
                for _ in range(runs):
                    drained = edited(base)
                    for step, ss, changes in (
                        ("full", base[:n], Changes(base[:n])),
                        ("add_one", base, Changes([base[n]])),
                        ("edit_one", drained, Changes([drained[len(drained) // 2]])),
                    ):
                        # as lb's offload manager drives it: told which service changed
                        times[step].append(await timed(applier.apply(ss, changes)))
                        kernel = applier.kernel_seconds()
                        if step in KERNEL_STEPS and kernel is not None:
                            times.setdefault(KERNEL_STEPS[step], []).append(kernel)
                    await applier.reset()
            results[name][n] = {step: Summary.of(v) for step, v in times.items()}
            advance(f"{name} at {n} services")
    return results
