"""The Kubernetes API as lb reads it: list pages and watch streams of raw JSON objects.

kubernetes-asyncio does the configuration (in-cluster service account or a kubeconfig:
server, TLS, token, exec plugins) and the HTTP requests; lb reads the answers itself
(`_preload_content=False`) so that objects stay the JSON the API sends, watch streams
are read in chunks of any size (an EndpointSlice line can pass aiohttp's line limit),
and a 410 is told apart from other failures.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

#: How long the server holds a watch open before closing it (kube-proxy's informers use
#: 5-10 minutes); the client gives up reading a little later than that.
WATCH_TIMEOUT = 300
READ_MARGIN = 30


class ApiError(Exception):
    """The API could not be read (network, HTTP status, bad JSON): retry with backoff."""


class Gone(ApiError):
    """410: the resource version (or continue token) is too old; list again."""


@dataclass(frozen=True, slots=True)
class Resource:
    """One kind of object, cluster-wide: how to list it with kubernetes-asyncio."""

    kind: str
    call: Callable[..., Awaitable[Any]]  # e.g. CoreV1Api.list_service_for_all_namespaces
    field_selector: str | None = None


class Api:
    """Reads resources through a kubernetes-asyncio ApiClient (closed by `close`)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes_asyncio import client

        self.client = api_client
        core = client.CoreV1Api(api_client)
        discovery = client.DiscoveryV1Api(api_client)
        self.services = Resource("Service", core.list_service_for_all_namespaces)
        self.endpoint_slices = Resource(
            "EndpointSlice", discovery.list_endpoint_slice_for_all_namespaces
        )
        self._nodes = core.list_node

    def node(self, name: str) -> Resource:
        return Resource("Node", self._nodes, f"metadata.name={name}")

    @classmethod
    async def connect(cls, kubeconfig: str | None) -> Api:
        """`kubeconfig` (or $KUBECONFIG), else the in-cluster service account; ApiError
        saying which was tried if neither works."""
        from kubernetes_asyncio import client, config

        cfg = client.Configuration()
        path = kubeconfig or os.environ.get("KUBECONFIG")
        try:
            if path:
                await config.load_kube_config(config_file=path, client_configuration=cfg)
            else:
                config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except (config.ConfigException, OSError, ValueError, TypeError, KeyError) as e:
            where = f"kubeconfig {path}" if path else "the in-cluster service account"
            hint = "" if path else " (outside a cluster, give --kubeconfig)"
            raise ApiError(f"cannot use {where}: {e}{hint}") from None
        return cls(client.ApiClient(cfg))

    async def close(self) -> None:
        await self.client.close()

    async def list_page(
        self, r: Resource, limit: int, continue_token: str | None
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"limit": limit}
        if continue_token:
            kwargs["_continue"] = continue_token
        resp = await self._call(r, kwargs, aiohttp.ClientTimeout(total=60))
        try:
            body = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ApiError(f"listing {r.kind}s: {_why(e)}") from None
        finally:
            resp.release()
        return _json_object(body, f"the list of {r.kind}s")

    async def watch(self, r: Resource, resource_version: str) -> AsyncIterator[dict[str, Any]]:
        """The events of one watch, from `resource_version`, until the server ends it."""
        kwargs: dict[str, Any] = {
            "watch": True,
            "resource_version": resource_version,
            "allow_watch_bookmarks": True,
            "timeout_seconds": WATCH_TIMEOUT,
        }
        timeout = aiohttp.ClientTimeout(sock_connect=10, sock_read=WATCH_TIMEOUT + READ_MARGIN)
        resp = await self._call(r, kwargs, timeout)
        buffer = b""
        try:
            async for chunk in resp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield _json_object(line, f"a {r.kind} watch event")
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ApiError(f"watching {r.kind}s: {_why(e)}") from None
        finally:
            resp.release()
        if buffer.strip():
            raise ApiError(f"watching {r.kind}s: the stream ended inside an event")

    async def _call(self, r: Resource, kwargs: dict[str, Any], limits: Any) -> Any:
        if r.field_selector is not None:
            kwargs["field_selector"] = r.field_selector
        try:
            resp = await r.call(_preload_content=False, _request_timeout=limits, **kwargs)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ApiError(f"{r.kind}s: {_why(e)}") from None
        except Exception as e:  # kubernetes_asyncio.client.ApiException (status 0: no answer)
            raise ApiError(f"{r.kind}s: {e}".strip()) from None
        if resp.status == 410:
            resp.release()
            raise Gone(f"{r.kind}s: 410 Gone (resource version or continue token expired)")
        if resp.status != 200:
            try:
                text = (await resp.read()).decode(errors="replace")
                message = json.loads(text).get("message", text)
            except (aiohttp.ClientError, ValueError, AttributeError):
                message = ""
            finally:
                resp.release()
            raise ApiError(f"{r.kind}s: HTTP {resp.status} {message}".strip())
        return resp


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError as e:
        raise ApiError(f"{what} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ApiError(f"{what} is not a JSON object")
    return value


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__
