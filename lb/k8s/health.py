"""The node proxy's health, as kube-proxy reports it: pure, with the time passed in.

- **Proxy health** (`/healthz`, `/livez`, kube-proxy's port 10256): unhealthy once a
  change from the API has waited longer than `timeout` (kube-proxy: twice its sync period)
  without a sync applying it; `/healthz` is also unhealthy while the Node is being deleted
  or is tainted `ToBeDeletedByClusterAutoscaler` (KEP-3836: load balancers then stop
  sending new connections to this node before it goes). `/livez` ignores the Node.
- **Service health** (a Service's `healthCheckNodePort`, for `externalTrafficPolicy:
  Local`): 200 while this node has at least one ready endpoint of the Service and the
  proxy is healthy, else 503, with kube-proxy's JSON. Cloud load balancers probe it on
  every node to send traffic only to nodes with local endpoints.
"""

from __future__ import annotations

import datetime
from typing import Any

from lb.k8s.translate import HealthCheck, Object

TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
HEALTHZ_PORT = 10256  # kube-proxy's healthz port


def node_eligible(node: Object | None) -> bool:
    """Not being deleted, not tainted for deletion (an unknown node is eligible)."""
    if node is None:
        return True
    if (node.get("metadata") or {}).get("deletionTimestamp"):
        return False
    taints = (node.get("spec") or {}).get("taints") or []
    return not any(isinstance(t, dict) and t.get("key") == TO_BE_DELETED_TAINT for t in taints)


class ProxyHealth:
    """When changes were queued and applied; the answers of /healthz and /livez."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.last_updated: float | None = None  # Unix time of the last sync that went through
        self.oldest_pending: float | None = None  # the oldest change no sync has taken yet
        self.in_flight: float | None = None  # the oldest change the running sync carries
        self.node_eligible = True

    def queued(self, now: float) -> None:
        """A change arrived from the API."""
        if self.oldest_pending is None:
            self.oldest_pending = now

    def syncing(self) -> None:
        """A sync starts: it carries every change queued so far."""
        self.in_flight = _oldest(self.in_flight, self.oldest_pending)
        self.oldest_pending = None

    def updated(self, now: float) -> None:
        """The sync went through (changes queued since wait for the next)."""
        self.in_flight = None
        self.last_updated = now

    def failed(self) -> None:
        """The sync failed: what it carried is pending again."""
        self.oldest_pending = _oldest(self.in_flight, self.oldest_pending)
        self.in_flight = None

    def healthy(self, now: float) -> bool:
        oldest = _oldest(self.in_flight, self.oldest_pending)
        return oldest is None or now - oldest < self.timeout

    def healthz(self, now: float) -> tuple[int, dict[str, Any]]:
        ok = self.healthy(now) and self.node_eligible
        body = self._times(now, ok)
        body["nodeEligible"] = self.node_eligible
        return (200 if ok else 503), body

    def livez(self, now: float) -> tuple[int, dict[str, Any]]:
        ok = self.healthy(now)
        return (200 if ok else 503), self._times(now, ok)

    def _times(self, now: float, ok: bool) -> dict[str, Any]:
        # as kube-proxy: a healthy proxy says it was updated now
        last = now if ok else self.last_updated
        return {"lastUpdated": _rfc3339(last), "currentTime": _rfc3339(now)}


def service_health(check: HealthCheck, proxy_healthy: bool) -> tuple[int, dict[str, Any]]:
    """The health-check node port's answer for one Service."""
    ok = check.local_endpoints > 0 and proxy_healthy
    body = {
        "service": {"namespace": check.service[0], "name": check.service[1]},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    }
    return (200 if ok else 503), body


def _oldest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _rfc3339(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="milliseconds")
