"""Fuzzing the admin API over real HTTP: whatever comes in, a 4xx (or 2xx), never a 5xx,
never a crash, and the balancer still serving afterwards."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.config import load_config
from lb.daemon import Daemon
from tests.support.net import free_port


class Running:
    def __init__(self, admin: tuple[str, int], port: int, backend: str) -> None:
        self.admin = admin
        self.port = port
        self.backend = backend


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A real lb (admin API and one service) on its own loop in a thread."""
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    backend_sock = socket.create_server(("127.0.0.1", 0))
    backend = f"127.0.0.1:{backend_sock.getsockname()[1]}"
    port, admin_port = free_port(), free_port()
    cfg = tmp / "lb.yaml"
    cfg.write_text(
        f"shutdown_grace: 0\nadmin: {{listen: 127.0.0.1:{admin_port}}}\nservices:\n"
        f"  - name: web\n    listen: 127.0.0.1:{port}\n    backends: [{{address: '{backend}'}}]\n"
    )
    loop = uvloop.new_event_loop()
    daemon = Daemon(cfg, None)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(daemon.start(load_config(cfg)))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield Running(("127.0.0.1", admin_port), port, backend)
    finally:
        asyncio.run_coroutine_threadsafe(daemon.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        backend_sock.close()


def request(r: Running, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*r.admin, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


segments = st.one_of(
    st.sampled_from(
        ["api", "v1", "services", "web", "backends", "metrics", "healthz", "readyz", "..", "%00"]
    ),
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12).map(
        lambda t: urllib.parse.quote(t, safe="")
    ),
)
paths = st.one_of(
    st.lists(segments, min_size=0, max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(["/api/v1/services/web/backends/BACKEND", "/api/v1/services/web"]),
)
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
edits = st.fixed_dictionaries(
    {},
    optional={
        "state": st.sampled_from(["ready", "drain", "maint", "up", ""]) | json_values,
        "weight": st.integers(-5, 70000) | json_values,
        "reset": st.booleans() | json_values,
    },
)
bodies = st.one_of(
    st.none(),
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    edits.map(lambda v: json.dumps(v).encode()),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=paths,
    body=bodies,
)
def test_no_request_makes_a_5xx(
    running: Running, method: str, path: str, body: bytes | None
) -> None:
    path = path.replace("BACKEND", running.backend)
    status, answer = request(running, method, path, body)
    assert status < 500, (method, path, body, answer)
    if status >= 400 and method != "HEAD":
        assert json.loads(answer)["status"] == status


def test_still_serving_after_the_fuzz(running: Running) -> None:
    assert request(running, "GET", "/healthz", None)[0] == 200
    # reset whatever state the fuzzer left, then check traffic still flows
    edit = f"/api/v1/services/web/backends/{running.backend}"
    assert request(running, "POST", edit, b'{"reset": true}')[0] == 200
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as s:
        s.sendall(b"ping")
