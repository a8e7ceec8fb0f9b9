"""A Kubernetes API server double that speaks the real wire protocol, for tests.

Cluster-wide list and watch of Services, EndpointSlices and Nodes, as the API server
serves them: one resourceVersion counter for everything, `limit`/`continue` pages
(a snapshot per list), `?watch=1` streams of JSON lines (ADDED, MODIFIED, DELETED,
BOOKMARK when asked for, ERROR 410 for a version older than the history kept), bearer
token auth. The test drives it: put/delete objects, compact history, send bookmarks,
expire or drop watches, stop and start it on the same port (an outage).

Each object is JSON-encoded once, when it is put: lists, pages and watch events are
joined from those bytes (no copy or encoding per request), so that the double serves
10,000 Services and their EndpointSlices fast enough for the bench (bench/k8s.py).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

from aiohttp import web

Obj = dict[str, Any]
RESOURCES = {
    "/api/v1/services": ("Service", "v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSlice", "discovery.k8s.io/v1"),
    "/api/v1/nodes": ("Node", "v1"),
}
KINDS = {kind: (path, version) for path, (kind, version) in RESOURCES.items()}


def status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class Watch:
    def __init__(
        self, kind: str, name: str | None, bookmarks: bool, response: web.StreamResponse
    ) -> None:
        self.kind = kind
        self.name = name  # a field selector metadata.name=NAME
        self.bookmarks = bookmarks
        self.response = response
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()  # encoded event lines


class FakeApiServer:
    def __init__(self, token: str | None = "test-token") -> None:
        self.token = token
        self.objects: dict[tuple[str, str, str], bytes] = {}  # each object's JSON
        #: (rv, kind, name, the encoded watch event line)
        self.history: list[tuple[int, str, str, bytes]] = []
        self.oldest = 0  # watches from a version below this get 410
        self.rv = 100
        self.watches: list[Watch] = []
        self.requests: list[tuple[str, str]] = []
        self._snapshots: dict[str, list[bytes]] = {}
        self._tokens = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.tls: ssl.SSLContext | None = None

    # --- the test's side ----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def resource_version(self) -> str:
        return str(self.rv)

    async def start(
        self,
        port: int = 0,
        sock: socket.socket | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """Listen on 127.0.0.1 (`port`, or the one of last time), or on `sock`: a socket
        made in another network namespace serves that namespace's loopback. With `tls`,
        HTTPS (as a real API server, which the in-cluster configuration insists on)."""
        self.tls = tls
        app = web.Application()
        for path in RESOURCES:
            app.router.add_get(path, self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(self._runner, sock, ssl_context=tls)
        else:
            site = web.TCPSite(
                self._runner,
                "127.0.0.1",
                port or self.port or 0,
                reuse_address=True,
                ssl_context=tls,
            )
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        await self.drop_connections()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def put(self, obj: Obj) -> Obj:
        meta = dict(obj.get("metadata") or {})  # the caller's object stays as it is
        obj = {**obj, "metadata": meta}
        kind = obj["kind"]
        key = (kind, meta.get("namespace", ""), meta["name"])
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        meta.setdefault("uid", f"uid-{kind}-{meta['name']}-{self.rv}")
        meta.setdefault("creationTimestamp", "2026-11-22T00:00:00Z")
        event = "MODIFIED" if key in self.objects else "ADDED"
        encoded = self.objects[key] = json.dumps(obj).encode()
        self._emit(event, kind, meta["name"], encoded)
        stored: Obj = json.loads(encoded)
        return stored

    def delete(self, kind: str, namespace: str, name: str) -> None:
        obj = json.loads(self.objects.pop((kind, namespace, name)))
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._emit("DELETED", kind, name, json.dumps(obj).encode())

    def bookmark(self) -> None:
        for w in self.watches:
            if w.bookmarks:
                _, version = KINDS[w.kind]
                meta = {"resourceVersion": str(self.rv)}
                w.queue.put_nowait(
                    _line(
                        {
                            "type": "BOOKMARK",
                            "object": {"kind": w.kind, "apiVersion": version, "metadata": meta},
                        }
                    )
                )

    def compact(self) -> None:
        """Forget the history: a watch from any version before now gets 410."""
        self.history.clear()
        self.oldest = self.rv + 1
        self._snapshots.clear()

    def expire_watches(self) -> None:
        for w in self.watches:
            w.queue.put_nowait(
                _line(
                    {"type": "ERROR", "object": status(410, "Expired", "too old resource version")}
                )
            )
            w.queue.put_nowait(None)

    async def drop_connections(self) -> None:
        """Abort every open watch, as a network failure would (no clean end)."""
        for w in list(self.watches):
            transport = w.response._req.transport if w.response._req else None
            if transport is not None:
                transport.abort()
            w.queue.put_nowait(None)
        await asyncio.sleep(0)

    def open_watches(self, kind: str | None = None) -> int:
        return sum(1 for w in self.watches if kind is None or w.kind == kind)

    async def wait_for_watches(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while self.open_watches() < n:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    def write_kubeconfig(self, path: Path) -> None:
        user: Obj = {"token": self.token} if self.token else {}
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "double", "cluster": {"server": self.url}}],
                    "users": [{"name": "lb", "user": user}],
                    "contexts": [
                        {"name": "double", "context": {"cluster": "double", "user": "lb"}}
                    ],
                    "current-context": "double",
                }
            )
        )

    # --- the API's side -----------------------------------------------------------------

    def _emit(self, event: str, kind: str, name: str, encoded: bytes) -> None:
        line = _event(event, encoded)
        self.history.append((self.rv, kind, name, line))
        for w in self.watches:
            if w.kind == kind and _selected(name, w):
                w.queue.put_nowait(line)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, request.query_string))
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        kind, version = RESOURCES[request.path]
        q = request.query
        selector = q.get("fieldSelector", "")
        if selector and not selector.startswith("metadata.name="):
            return web.json_response(
                status(400, "BadRequest", f"unsupported field selector {selector}"), status=400
            )
        name = selector.partition("=")[2] or None
        if _bool(q.get("watch")):
            return await self._watch(request, kind, name)
        return self._list(kind, version, name, q)

    def _current(self, kind: str, name: str | None) -> list[bytes]:
        """The encoded objects of `kind` (named `name`), in key order."""
        chosen = [
            (key, e)
            for key, e in self.objects.items()
            if key[0] == kind and (name is None or key[2] == name)
        ]
        return [e for _, e in sorted(chosen, key=lambda item: item[0])]

    def _list(self, kind: str, version: str, name: str | None, q: Any) -> web.Response:
        token = q.get("continue")
        if token:
            if token not in self._snapshots:
                return web.json_response(
                    status(410, "Expired", "the provided continue parameter is too old"),
                    status=410,
                )
            items, rv = self._snapshots.pop(token), token.split("-")[0]
        else:
            items, rv = self._current(kind, name), str(self.rv)
        limit = int(q.get("limit", "0") or 0)
        meta: Obj = {"resourceVersion": rv}
        if limit and len(items) > limit:
            next_token = f"{rv}-{next(self._tokens)}"
            self._snapshots[next_token] = items[limit:]
            items = items[:limit]
            meta["continue"] = next_token
        head = {"kind": f"{kind}List", "apiVersion": version, "metadata": meta}
        body = json.dumps(head).encode()[:-1] + b', "items": [' + b", ".join(items) + b"]}"
        return web.Response(body=body, content_type="application/json")

    async def _watch(self, request: web.Request, kind: str, name: str | None) -> web.StreamResponse:
        q = request.query
        since = int(q.get("resourceVersion") or 0)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        w = Watch(kind, name, _bool(q.get("allowWatchBookmarks")), response)
        if since == 0:
            for encoded in self._current(kind, name):
                w.queue.put_nowait(_event("ADDED", encoded))
        elif since < self.oldest - 1:
            w.queue.put_nowait(
                _line(
                    {
                        "type": "ERROR",
                        "object": status(
                            410, "Expired", f"too old resource version: {since} ({self.oldest})"
                        ),
                    }
                )
            )
            w.queue.put_nowait(None)
        else:
            for rv, k, n, line in self.history:
                if rv > since and k == kind and _selected(n, w):
                    w.queue.put_nowait(line)
        self.watches.append(w)
        timeout = float(q.get("timeoutSeconds") or 3600)
        try:
            async with asyncio.timeout(timeout):
                while (event := await w.queue.get()) is not None:
                    await response.write(event)
            await response.write_eof()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self.watches.remove(w)
        return response


def _bool(text: str | None) -> bool:
    """Go's strconv.ParseBool, as the API server parses `watch` (kubernetes-asyncio sends
    `True`)."""
    return text in ("1", "t", "T", "TRUE", "true", "True")


def _selected(name: str, w: Watch) -> bool:
    return w.name is None or name == w.name


def _event(event: str, encoded: bytes) -> bytes:
    """A watch event line around an encoded object."""
    return b'{"type": "' + event.encode() + b'", "object": ' + encoded + b"}\n"


def _line(item: Obj) -> bytes:
    return json.dumps(item).encode() + b"\n"


# --- objects as `kubectl get -o json` shows them -------------------------------------------


def service(
    name: str,
    *,
    namespace: str = "default",
    cluster_ip: str = "10.96.0.10",
    ports: list[Obj] | None = None,
    type: str = "ClusterIP",
    session_affinity: int | None = None,
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    internal_traffic_policy: str = "Cluster",
) -> Obj:
    spec: Obj = {
        "type": type,
        "selector": {"app": name},
        "sessionAffinity": "None" if session_affinity is None else "ClientIP",
        "internalTrafficPolicy": internal_traffic_policy,
    }
    if type == "ExternalName":
        spec = {"type": type, "externalName": f"{name}.example.com", "sessionAffinity": "None"}
    else:
        spec |= {
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "ports": ports
            if ports is not None
            else [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        }
        if type in ("NodePort", "LoadBalancer"):
            spec["externalTrafficPolicy"] = "Cluster"
    if session_affinity is not None:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": session_affinity}}
    meta: Obj = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    if labels:
        meta["labels"] = labels
    return {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": spec,
        "status": {"loadBalancer": {}},
    }


def endpoint(
    ip: str,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    node_name: str = "node-1",
) -> Obj:
    return {
        "addresses": [ip],
        "conditions": {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        },
        "nodeName": node_name,
        "targetRef": {"kind": "Pod", "name": f"pod-{ip.replace('.', '-')}", "namespace": "default"},
    }


def endpoint_slice(
    name: str,
    service: str,
    *,
    namespace: str = "default",
    endpoints: list[Obj] | None = None,
    ports: list[Obj] | None = None,
    trigger_time: str | None = None,
) -> Obj:
    meta: Obj = {
        "name": name,
        "namespace": namespace,
        "generateName": f"{service}-",
        "labels": {
            "kubernetes.io/service-name": service,
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
        },
        "ownerReferences": [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "name": service,
                "controller": True,
                "blockOwnerDeletion": True,
                "uid": f"uid-Service-{service}",
            }
        ],
    }
    if trigger_time:
        meta["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger_time}
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": meta,
        "addressType": "IPv4",
        "endpoints": endpoints or [],
        "ports": ports
        if ports is not None
        else [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def node(name: str, internal_ip: str, external_ip: str | None = None) -> Obj:
    addresses = [{"type": "InternalIP", "address": internal_ip}]
    if external_ip:
        addresses.append({"type": "ExternalIP", "address": external_ip})
    addresses.append({"type": "Hostname", "address": name})
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {"addresses": addresses},
    }


def self_signed_cert(cert: Path, key: Path) -> None:
    """A certificate for the API double on 127.0.0.1 (also its own CA, as a service
    account's ca.crt), with openssl."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=kubernetes",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
