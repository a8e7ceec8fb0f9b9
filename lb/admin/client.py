"""A small client of the admin API for the CLI (stdlib only: no event loop needed)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class AdminError(Exception):
    """What went wrong talking to the admin API, in words fit for the terminal."""


class AdminClient:
    def __init__(self, base: str, token: str | None = None, timeout: float = 5.0) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                result: dict[str, Any] = json.loads(resp.read() or b"{}")
                return result
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", e.reason)
            except (ValueError, AttributeError):
                message = e.reason
            raise AdminError(f"{message} (HTTP {e.code})") from None
        except urllib.error.URLError as e:
            reason = getattr(e.reason, "strerror", None) or str(e.reason)
            raise AdminError(f"cannot reach the admin API at {self.base}: {reason}") from None
        except (TimeoutError, OSError) as e:
            raise AdminError(f"cannot reach the admin API at {self.base}: {e}") from None

    def services(self) -> list[dict[str, Any]]:
        services: list[dict[str, Any]] = self.listing()["services"]
        return services

    def listing(self) -> dict[str, Any]:
        """Every service, and the kernel path in a line (None: userspace only)."""
        doc: dict[str, Any] = self._call("GET", "/api/v1/services")
        return doc

    def edit(self, service: str, backend: str, body: dict[str, Any]) -> dict[str, Any]:
        path = "/api/v1/services/{}/backends/{}".format(
            urllib.parse.quote(service, safe=""), urllib.parse.quote(backend, safe="")
        )
        return self._call("POST", path, body)
