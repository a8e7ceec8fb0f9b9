"""The layers of lb and offload, and which way imports may go between them.

tests/test_layers.py reads every module's imports (top level and inside functions) and
fails on one this table does not allow, or on a module it does not place.

- core: the desired-state model, changes, schedulers, persistence, plans, policy, rule
  rendering. Pure: no I/O, no event loop; it imports only the core.
- support: process-wide helpers that do I/O on the side (logging, exhaustion counts).
- userspace, kernel: the two kinds of dataplane. Each imports the core, support and
  itself, never the other one nor the application.
- app: what wires the dataplanes to sources and operators (controller, offload manager,
  daemon, config loading, Kubernetes source, admin API, metrics, CLI).
- tools: the benchmark harness, on top of everything.

An entry names one module, or with `.*` a package and everything in it. A new module
must be placed here: the test fails on one the table does not name.
"""

from __future__ import annotations

#: layer -> the modules (or packages) in it
LAYERS: dict[str, tuple[str, ...]] = {
    "core": (
        "lb",  # the package itself: __version__
        "lb.model",
        "lb.changes",
        "lb.sched.*",
        "lb.persist",
        "lb.virtual_service",
        "lb.plan",
        "lb.health",  # the package only: lb.health.state is core, the rest userspace
        "lb.health.state",
        "lb.rates",
        "lb.stats",
        "lb.proxy_header",
        "lb.k8s",  # the package only
        "lb.k8s.translate",
        "lb.k8s.health",
        "lb.layers",
        "offload",  # the package only
        "offload.policy",
        "offload.placement",
        "offload.nft_rules",
        "offload.ipvs_model",
    ),
    "support": (
        "lb.log",
        "lb.exhaustion",
    ),
    "userspace": (
        "lb.proxy.*",
        "lb.health.monitor",
        "lb.health.probes",
    ),
    "kernel": (
        "offload.conntrack",
        "offload.host",
        "offload.ipvs",
        "offload.ipvs_netlink",
        "offload.ipvs_sync",
        "offload.kernel",
        "offload.netns",
        "offload.nft_netlink",
        "offload.nftables",
        "offload.nlthread",
    ),
    "app": (
        "lb.__main__",
        "lb.admin.*",
        "lb.cli",
        "lb.config",
        "lb.controller",
        "lb.daemon",
        "lb.demo",
        "lb.k8s.api",
        "lb.k8s.health_server",
        "lb.k8s.informer",
        "lb.k8s.source",
        "lb.loader",
        "lb.metrics",
        "offload.commands",
        "offload.manager",
    ),
    "tools": ("bench.*",),
}

#: layer -> the layers its modules may import (their own always included)
MAY_IMPORT: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "support": frozenset(),
    "userspace": frozenset({"core", "support"}),
    "kernel": frozenset({"core", "support"}),
    "app": frozenset({"core", "support", "userspace", "kernel"}),
    "tools": frozenset({"core", "support", "userspace", "kernel", "app"}),
}

#: Top-level packages the core must not import: they do I/O or run an event loop.
CORE_FORBIDDEN = frozenset(
    {
        "aiohttp",
        "asyncio",
        "ctypes",
        "kubernetes_asyncio",
        "os",
        "pathlib",
        "prometheus_client",
        "pyroute2",
        "resource",
        "shutil",
        "signal",
        "socket",
        "subprocess",
        "threading",
        "uvloop",
    }
)


def layer_of(module: str) -> str | None:
    """The layer of a module of lb, offload or bench; None if the table does not place it."""
    for layer, entries in LAYERS.items():
        for entry in entries:
            package = entry.removesuffix(".*")
            if module == package or (entry.endswith(".*") and module.startswith(package + ".")):
                return layer
    return None


def allowed(importer: str, imported: str) -> bool:
    """Whether a module of layer `importer` may import one of layer `imported`."""
    return imported == importer or imported in MAY_IMPORT[importer]
