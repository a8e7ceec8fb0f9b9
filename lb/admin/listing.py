"""`lb list`: the admin API's state in the layout of `ipvsadm -Ln` (and --stats, --rate),
with a dataplane column for services and a state column for backends."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from lb import __version__
from lb.stats import COLUMNS, RATED

Service = dict[str, Any]
STATS_COLUMNS = " ".join(f"{s.column:>8}" for s in COLUMNS)
RATE_COLUMNS = " ".join(f"{s.rate_column:>8}" for s in RATED)
FORWARD = {"userspace": "Proxy", "ipvs": "Masq", "nftables": "Masq"}
JHASH_NOTE = (
    "sh in nftables hashes with jhash: each client keeps its backend, "
    "but not the backend IPVS's sh would pick"
)


def largenum(n: float, exact: bool) -> str:
    """ipvsadm's print_largenum(): 8 columns, K/M/G past 8 digits unless --exact."""
    n = int(n)
    if exact or n < 100_000_000:
        return f"{n:8d}"
    for div, unit in ((1000, "K"), (1_000_000, "M"), (1_000_000_000, "G")):
        if n // div < 10_000_000:
            return f"{n // div:7d}{unit}"
    return f"{n // 1_000_000_000_000:7d}T"


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def resolver(numeric: bool) -> Callable[[str], str]:
    """Without -n, names for addresses and ports, as ipvsadm shows them."""

    def show(address: str) -> str:
        if numeric:
            return address
        host, port = _split(address)
        try:
            name, service = socket.getnameinfo((host, port), 0)
        except OSError:
            return address
        return f"[{name}]:{service}" if ":" in name else f"{name}:{service}"

    return show


def _service_head(s: Service, show: Callable[[str], str]) -> str:
    head = f"{s['protocol'].upper():<4} {show(s['listen'])} {s['scheduler']}"
    if s["flags"]:
        head += f" ({','.join(s['flags'])})"
    p = s["persistence"]
    if p:
        head += f" persistent {p['timeout']}"
        if p["netmask"] not in ("255.255.255.255", 128):
            head += f" mask {p['netmask']}"
    return head


def render(
    services: list[Service],
    *,
    numeric: bool,
    mode: str = "",
    exact: bool = False,
    persistent: bool = False,
    kernel: str | None = None,
) -> str:
    """As ipvsadm -Ln prints them; `mode` "stats" or "rate": its --stats or --rate
    columns; `persistent`: its --persistent-conn column (templates per backend);
    `kernel`: the kernel path in a line, last (None: userspace only, nothing said)."""
    show = resolver(numeric)
    services = sorted(services, key=lambda s: (s["protocol"], s["listen"]))
    lines = [f"IP Virtual Server version 1.2.1 (lb {__version__})"]
    if mode:
        columns = STATS_COLUMNS if mode == "stats" else RATE_COLUMNS
        lines += [
            f"{'Prot LocalAddress:Port':<33}{columns} Dataplane",
            f"{'  -> RemoteAddress:Port':<78} State",
        ]
    else:
        persist_head = "PersistConn " if persistent else ""
        lines += [
            "Prot LocalAddress:Port Scheduler Flags                      Dataplane",
            f"  -> RemoteAddress:Port           Forward Weight {persist_head}"
            "ActiveConn InActConn State",
        ]
    for s in services:
        if mode:
            lines.append(
                f"{_service_head_short(s, show):<33}{_numbers(s, mode, exact)} {s['dataplane']}"
            )
        else:
            lines.append(f"{_service_head(s, show):<59} {s['dataplane']}")
        for b in s["backends"]:
            name = f"  -> {show(b['address'])}"
            if mode:
                lines.append(f"{name:<33}{_numbers(b, mode, exact)} {b['state']}")
            else:
                fwd = FORWARD.get(s["dataplane"], "Masq")
                weight, active, inactive = b["effective_weight"], b["active"], b["inactive"]
                persist = f"{b['persistent']:<11} " if persistent else ""
                lines.append(
                    f"{name:<33} {fwd:<7} {weight:<6} {persist}{active:<10} {inactive:<10} "
                    f"{b['state']}"
                )
    stays = [
        f"  {s['name']} ({s['protocol']} {s['listen']}): {s['offload']['reason']}"
        for s in services
        if s.get("offload")
        and s["offload"]["placement"] == "userspace"
        and s["offload"]["reason"] != "dataplane: userspace"
    ]
    if stays:
        lines += ["", "Not offloaded:", *stays]
    notes = [
        f"  {s['name']} ({s['protocol']} {s['listen']}): {JHASH_NOTE}"
        for s in services
        if s["dataplane"] == "nftables" and s["scheduler"] == "sh"
    ]
    if notes:
        lines += ["", "Notes:", *notes]
    if kernel is not None:
        lines += ["", f"Kernel dataplane: {kernel}"]
    return "\n".join(lines)


def _service_head_short(s: Service, show: Callable[[str], str]) -> str:
    return f"{s['protocol'].upper():<4} {show(s['listen'])}"


def _numbers(item: dict[str, Any], mode: str, exact: bool) -> str:
    if mode == "rate":
        values = [item["rates"][s.rate] for s in RATED]
    else:
        values = [_at(item["connections"], s.view) for s in COLUMNS]
    return " ".join(largenum(v, exact) for v in values)


def _at(view: dict[str, Any], path: tuple[str, ...]) -> float:
    """The number at `path` of the admin API's connections object (0 where its group is
    null: packets of a TCP service)."""
    node: Any = view
    for part in path:
        if node is None:
            return 0
        node = node[part]
    return float(node or 0)
