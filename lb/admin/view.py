"""JSON views of the running balancer, built from dataplane snapshots: pure functions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lb.controller import BackendKey, Override
from lb.health.monitor import Monitor
from lb.metrics import backend_state_label
from lb.rates import RateEstimator, Rates
from lb.stats import RATED, BackendSnapshot, ServiceSnapshot, totals_json

JSON = dict[str, Any]


def _rates(r: Rates) -> JSON:
    return {s.rate: getattr(r, s.rate) for s in RATED if s.rate is not None}


def backend_json(
    s: ServiceSnapshot,
    b: BackendSnapshot,
    monitors: Mapping[BackendKey, Monitor],
    overrides: Mapping[BackendKey, Override],
    rates: RateEstimator,
) -> JSON:
    key = (s.service.key, b.address)
    desired = b.backend
    m = monitors.get(key)
    o = overrides.get(key)
    return {
        "address": str(b.address),
        "state": backend_state_label(b).value,
        "removed": desired is None,
        "admin": desired.admin.value if desired else None,
        "healthy": desired.healthy if desired else None,
        "weight": desired.weight if desired else None,
        "effective_weight": b.weight,
        "override": None if o is None else {
            "state": o.admin.value if o.admin else None, "weight": o.weight
        },
        "max_connections": desired.max_connections if desired else None,
        "resume_below": desired.resume_below if desired else None,
        "active": b.active,
        "inactive": b.inactive,
        "persistent": b.persistent,
        "overloaded": b.overloaded,
        "connections": totals_json(b.totals, s.service.protocol),
        "rates": _rates(rates.backend(s.service.key, b.address, s.dataplane)),
        "health": None if m is None else {
            "running": m.running, "checks": m.checks, "failures": m.failures, "last": m.last_reason
        },
    }  # fmt: skip


def service_json(
    s: ServiceSnapshot,
    monitors: Mapping[BackendKey, Monitor],
    overrides: Mapping[BackendKey, Override],
    rates: RateEstimator,
    offload: tuple[str, str] | None = None,
) -> JSON:
    svc = s.service
    p = svc.persistence
    netmask: str | int | None = None
    if p is not None:
        if svc.listen.family == 4:
            netmask = ".".join(
                str((0xFFFFFFFF << (32 - p.prefix_len) >> s) & 0xFF) for s in (24, 16, 8, 0)
            )
        else:
            netmask = p.prefix_len
    return {
        "name": svc.name,
        "protocol": svc.protocol.value,
        "listen": str(svc.listen),
        "dataplane": s.dataplane,
        "scheduler": svc.scheduler.value,
        "flags": sorted(f"{svc.scheduler}-{f}" for f in svc.flags),
        "persistence": None if p is None else {"timeout": p.timeout, "netmask": netmask},
        "listening": s.listening,
        "open": s.open,
        "connections": totals_json(s.totals, svc.protocol),
        "rates": _rates(rates.service(svc.key, s.dataplane)),
        "offload": None if offload is None else {"placement": offload[0], "reason": offload[1]},
        "backends": [backend_json(s, b, monitors, overrides, rates) for b in s.backends],
    }
