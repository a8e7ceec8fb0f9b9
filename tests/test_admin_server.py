"""The admin API over real HTTP against a running balancer: state, metrics, runtime edits,
hostile input, and the safety rules."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lb.admin import server as admin_server
from lb.config import ConfigError, load_config, parse_config
from lb.daemon import Daemon, StartError
from tests.support.net import TcpBackend, eventually, free_port, read_line


def web_config(
    port: int, backends: list[str], extra: str = "", admin: str = "", svc_extra: str = ""
) -> str:
    admin = admin or f"{{listen: 127.0.0.1:{free_port()}}}"
    lines = "".join(f"      - {{address: '{b}'}}\n" for b in backends) or "      []\n"
    return (
        f"shutdown_grace: 0\nadmin: {admin}\n{extra}services:\n  - name: web\n    listen: 127.0.0.1:{port}\n"
        f"    scheduler: rr\n{svc_extra}    backends:\n{lines}"
    )


@contextlib.asynccontextmanager
async def running(tmp_path: Path, text: str) -> AsyncIterator[tuple[Daemon, str]]:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(text)
    d = Daemon(cfg, None)
    await d.start(load_config(cfg))
    try:
        yield d, f"http://{d.config.admin.listen}"
    finally:
        await d.stop()


async def call(
    method: str,
    url: str,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with http.request(method, url, data=data, headers=headers) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name} {labels}")


async def test_health_and_readiness(tmp_path: Path) -> None:
    port = free_port()
    async with running(tmp_path, web_config(port, [])) as (d, url):
        assert await call("GET", url + "/healthz") == (200, {"status": "alive"})
        assert await call("GET", url + "/readyz") == (200, {"ready": True})
        d.readiness.set_not_ready("stopping")
        assert await call("GET", url + "/readyz") == (503, {"ready": False, "reason": "stopping"})


async def test_metrics_follow_real_traffic(tmp_path: Path) -> None:
    backend = await TcpBackend("A").start()
    port = free_port()
    check = "    health_check: {type: tcp, interval: 100ms, timeout: 100ms}\n"
    admin = f"{{listen: 127.0.0.1:{free_port()}, backend_metrics: true}}"
    text = web_config(port, [backend.address], admin=admin, svc_extra=check)
    async with running(tmp_path, text) as (d, url):
        _, before = await call("GET", url + "/metrics")
        assert metric(before, "lb_service_connections_total", service="web") == 0
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            writer.write(b"x" * 1000)
            await reader.readexactly(1000)
            writer.close()
        await eventually(lambda: d.dataplane.observe()[0].open == 0)
        await asyncio.sleep(0.25)  # let a couple of health checks run
        status, text = await call("GET", url + "/metrics")
        assert status == 200
        lbl = {"service": "web", "backend": backend.address, "dataplane": "userspace"}
        assert (
            metric(text, "lb_service_connections_total", service="web", dataplane="userspace") == 5
        )
        assert metric(text, "lb_backend_connections_total", **lbl) == 5
        assert metric(text, "lb_backend_in_bytes_total", **lbl) == 5000
        assert metric(text, "lb_backend_out_bytes_total", **lbl) == 5 * (2 + 1000)
        assert metric(text, "lb_backend_connections_inactive", **lbl) == 5  # in TIME_WAIT
        assert metric(text, "lb_backend_up", state="UP", **lbl) == 1
        assert metric(text, "lb_backend_up", state="DOWN", **lbl) == 0
        assert metric(text, "lb_backend_weight", **lbl) == 1
        assert metric(text, "lb_health_checks_total", service="web", backend=backend.address) >= 2
        assert metric(text, "lb_sync_duration_seconds_count", dataplane="userspace") >= 1
        assert metric(text, "lb_config_reloads_total", result="success") == 0
        # reloads, good and bad, are counted
        d.config_path.write_text(
            d.config_path.read_text().replace("scheduler: rr", "scheduler: wrr")
        )
        await d.reload()
        d.config_path.write_text("services: [{}]\n")
        await d.reload()
        _, text = await call("GET", url + "/metrics")
        assert metric(text, "lb_config_reloads_total", result="success") == 1
        assert metric(text, "lb_config_reloads_total", result="failure") == 1


async def test_metrics_per_backend_only_when_the_config_asks(tmp_path: Path) -> None:
    """admin.backend_metrics: per-service series always, per-backend and health-check
    ones only when true (false by default)."""
    backend = await TcpBackend("A").start()
    check = "    health_check: {type: tcp, interval: 100ms, timeout: 100ms}\n"
    for setting, shown in (
        ("", False),
        (", backend_metrics: false", False),
        (", backend_metrics: true", True),
    ):
        port = free_port()
        admin = f"{{listen: 127.0.0.1:{free_port()}{setting}}}"
        text = web_config(port, [backend.address], admin=admin, svc_extra=check)
        async with running(tmp_path, text) as (d, url):
            assert await read_line("127.0.0.1", port) == "A"
            await eventually(lambda: sum(m.checks for m in d.controller.monitors.values()) > 0)
            status, page = await call("GET", url + "/metrics")
            assert status == 200
            svc = {"service": "web", "dataplane": "userspace"}
            assert metric(page, "lb_service_connections_total", **svc) == 1
            assert metric(page, "lb_service_backends", state="UP", **svc) == 1
            assert metric(page, "lb_service_backends", state="DOWN", **svc) == 0
            families = {f.name for f in text_string_to_metric_families(page)}
            per_backend = {f for f in families if f.startswith(("lb_backend_", "lb_health_check"))}
            assert ("backend=" in page) is shown, setting
            if shown:
                assert metric(page, "lb_backend_connections_total", backend=backend.address) == 1
                assert metric(page, "lb_health_checks_total", backend=backend.address) >= 1
                assert {"lb_backend_up", "lb_backend_weight", "lb_health_checks"} <= per_backend
            else:
                assert not per_backend


async def test_services_json(tmp_path: Path) -> None:
    a, b = await TcpBackend("A").start(), await TcpBackend("B").start()
    port = free_port()
    async with running(tmp_path, web_config(port, [a.address, b.address])) as (_, url):
        assert await read_line("127.0.0.1", port) == "B"
        status, body = await call("GET", url + "/api/v1/services")
        assert status == 200
        (svc,) = body["services"]
        assert svc["name"] == "web" and svc["dataplane"] == "userspace" and svc["scheduler"] == "rr"
        assert [x["address"] for x in svc["backends"]] == [b.address, a.address]  # kernel order
        first = svc["backends"][0]
        assert (
            first["state"] == "UP" and first["weight"] == 1 and first["connections"]["total"] == 1
        )
        assert (await call("GET", url + "/api/v1/services/web"))[1]["name"] == "web"
        assert (await call("GET", url + "/api/v1/services/nope"))[0] == 404


async def test_drain_under_live_connections(tmp_path: Path) -> None:
    a, b = await TcpBackend("A").start(), await TcpBackend("B").start()
    port = free_port()
    async with running(tmp_path, web_config(port, [a.address, b.address])) as (_, url):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"B\n"
        status, body = await call(
            "POST", f"{url}/api/v1/services/web/backends/{b.address}", {"state": "drain"}
        )
        assert status == 200 and body["state"] == "DRAIN" and body["effective_weight"] == 0
        accepted = b.accepted
        assert [await read_line("127.0.0.1", port) for _ in range(10)] == ["A"] * 10
        assert b.accepted == accepted  # not one new connection reached B
        writer.write(b"still served")
        assert await asyncio.wait_for(reader.readexactly(12), 2) == b"still served"
        writer.close()
        status, body = await call(
            "POST", f"{url}/api/v1/services/web/backends/{b.address}", {"state": "ready"}
        )
        assert status == 200 and body["state"] == "UP"
        assert "B" in {await read_line("127.0.0.1", port) for _ in range(4)}


async def test_weight_edit_and_reset(tmp_path: Path) -> None:
    a, b = await TcpBackend("A").start(), await TcpBackend("B").start()
    port = free_port()
    async with running(tmp_path, web_config(port, [a.address, b.address])) as (d, url):
        edit = f"{url}/api/v1/services/web/backends/{a.address}"
        status, body = await call("POST", edit, {"weight": 0})
        assert (
            status == 200
            and body["weight"] == 0
            and body["override"] == {"state": None, "weight": 0}
        )
        assert {await read_line("127.0.0.1", port) for _ in range(4)} == {"B"}
        # a reload keeps the runtime edit while the backend is still in the file
        await d.reload()
        assert {await read_line("127.0.0.1", port) for _ in range(4)} == {"B"}
        status, body = await call("POST", edit, {"reset": True})
        assert status == 200 and body["weight"] == 1 and body["override"] is None
        assert {await read_line("127.0.0.1", port) for _ in range(4)} == {"A", "B"}


async def test_maint_stops_health_checks(tmp_path: Path) -> None:
    a = await TcpBackend("A").start()
    port = free_port()
    check = "    health_check: {type: tcp, interval: 100ms, timeout: 100ms}\n"
    async with running(tmp_path, web_config(port, [a.address], svc_extra=check)) as (d, url):
        (monitor,) = d.controller.monitors.values()
        assert monitor.running
        status, body = await call(
            "POST", f"{url}/api/v1/services/web/backends/{a.address}", {"state": "maint"}
        )
        assert status == 200 and body["state"] == "MAINT"
        await eventually(lambda: not monitor.running)
        await call("POST", f"{url}/api/v1/services/web/backends/{a.address}", {"state": "ready"})
        await eventually(lambda: monitor.running)


HOSTILE = [
    ("GET", "/api/v1/services/web/backends/127.0.0.1:1", None, None, 405),
    ("PUT", "/api/v1/services/web/backends/127.0.0.1:1", None, b"{}", 405),
    ("DELETE", "/api/v1/services", None, None, 405),
    ("GET", "/nope", None, None, 404),
    ("GET", "/api/v1/services/web/../../etc/passwd", None, None, 404),
    ("POST", "/api/v1/services/nope/backends/127.0.0.1:1", {"state": "drain"}, None, 404),
    ("POST", "/api/v1/services/web/backends/10.9.9.9:1", {"state": "drain"}, None, 404),
    ("POST", "/api/v1/services/web/backends/not-an-address", {"state": "drain"}, None, 404),
    ("POST", "/api/v1/services/web/backends/BACKEND", None, b"{not json", 400),
    ("POST", "/api/v1/services/web/backends/BACKEND", None, b"\xff\xfe", 400),
    ("POST", "/api/v1/services/web/backends/BACKEND", None, b"", 400),
    ("POST", "/api/v1/services/web/backends/BACKEND", [1, 2], None, 400),
    ("POST", "/api/v1/services/web/backends/BACKEND", {}, None, 400),
    ("POST", "/api/v1/services/web/backends/BACKEND", {"state": "up"}, None, 400),
    ("POST", "/api/v1/services/web/backends/BACKEND", {"weight": -1}, None, 400),
    ("POST", "/api/v1/services/web/backends/BACKEND", {"weight": 70000}, None, 400),
    ("POST", "/api/v1/services/web/backends/BACKEND", {"weight": "3"}, None, 400),
    ("POST", "/api/v1/services/web/backends/BACKEND", {"weight": 2.5}, None, 400),
    ("POST", "/api/v1/services/web/backends/BACKEND", {"weight": True}, None, 400),
    ("POST", "/api/v1/services/web/backends/BACKEND", {"state": "drain", "colour": 1}, None, 400),
    ("POST", "/api/v1/services/web/backends/BACKEND", None, b"{" + b'"a":' * 10000 + b"}", 413),
    ("POST", "/api/v1/services/web/backends/BACKEND", None, b"x" * 100_000, 413),
]


async def test_hostile_input_gets_4xx_and_the_balancer_serves_on(tmp_path: Path) -> None:
    a = await TcpBackend("A").start()
    port = free_port()
    async with running(tmp_path, web_config(port, [a.address])) as (d, url):
        for method, path, body, raw, expected in HOSTILE:
            status, answer = await call(method, url + path.replace("BACKEND", a.address), body, raw)
            assert status == expected, (method, path, body, answer)
            assert isinstance(answer, dict) and answer["status"] == expected and answer["error"]
        # a half-applied request would show here: weight and state unchanged
        (svc,) = (await call("GET", url + "/api/v1/services"))[1]["services"]
        assert svc["backends"][0]["state"] == "UP" and svc["backends"][0]["override"] is None
        assert await read_line("127.0.0.1", port) == "A"
        assert d.dataplane.observe()[0].listening


async def test_bad_value_in_a_two_field_edit_applies_nothing(tmp_path: Path) -> None:
    a = await TcpBackend("A").start()
    port = free_port()
    async with running(tmp_path, web_config(port, [a.address])) as (_, url):
        status, _ = await call(
            "POST",
            f"{url}/api/v1/services/web/backends/{a.address}",
            {"state": "drain", "weight": -5},
        )
        assert status == 400
        assert await read_line("127.0.0.1", port) == "A"


async def test_token_guards_changes_not_reads(tmp_path: Path) -> None:
    a = await TcpBackend("A").start()
    port = free_port()
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    admin = f"{{listen: 127.0.0.1:{free_port()}, token_file: {token}}}"
    async with running(tmp_path, web_config(port, [a.address], admin=admin)) as (_, url):
        edit = f"{url}/api/v1/services/web/backends/{a.address}"
        assert (await call("POST", edit, {"state": "drain"}))[0] == 401
        assert (
            await call("POST", edit, {"state": "drain"}, headers={"Authorization": "Bearer nope"})
        )[0] == 401
        assert (await call("POST", edit, {"state": "drain"}, headers={"Authorization": "s3cret"}))[
            0
        ] == 401
        assert (await call("GET", url + "/api/v1/services"))[0] == 200
        assert (await call("GET", url + "/metrics"))[0] == 200
        ok = await call(
            "POST", edit, {"state": "drain"}, headers={"Authorization": "Bearer s3cret"}
        )
        assert ok[0] == 200 and ok[1]["state"] == "DRAIN"


async def test_slow_and_idle_admin_clients_are_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_server, "IDLE_TIMEOUT", 0.5)
    port = free_port()
    async with running(tmp_path, web_config(port, [])) as (d, url):
        host, admin_port = d.config.admin.listen.sockaddr()
        idle_r, idle_w = await asyncio.open_connection(host, admin_port)
        slow_r, slow_w = await asyncio.open_connection(host, admin_port)
        slow_w.write(b"GET /heal")  # a request line that never ends
        start = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(idle_r.read(), 5) == b""
        assert await asyncio.wait_for(slow_r.read(), 5) == b""
        assert asyncio.get_running_loop().time() - start < 4
        idle_w.close()
        slow_w.close()
        assert (await call("GET", url + "/healthz"))[0] == 200


def test_admin_is_loopback_unless_allowed_and_then_needs_a_token() -> None:
    base = "services: []\nadmin: "
    with pytest.raises(ConfigError) as e:
        parse_config(base + "{listen: 0.0.0.0:9090}\n")
    assert "0.0.0.0 is not a loopback address: set admin.allow_remote: true" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config(base + "{listen: 0.0.0.0:9090, allow_remote: true}\n")
    assert "admin.token_file: required when allow_remote is true" in str(e.value)
    cfg = parse_config(base + "{listen: 0.0.0.0:9090, allow_remote: true, token_file: /t}\n")
    assert cfg.admin.allow_remote and cfg.admin.token_file == "/t"
    assert parse_config("services: []\n").admin.listen.ip.is_loopback  # the default


async def test_unreadable_token_file_stops_start_up(tmp_path: Path) -> None:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(
        f"admin: {{listen: 127.0.0.1:{free_port()}, token_file: {tmp_path}/missing}}\nservices: []\n"
    )
    d = Daemon(cfg, None)
    with pytest.raises(StartError) as e:
        await d.start(load_config(cfg))
    assert "cannot read admin.token_file" in str(e.value)


async def test_runtime_edit_is_dropped_when_the_backend_leaves_the_file(tmp_path: Path) -> None:
    a, b = await TcpBackend("A").start(), await TcpBackend("B").start()
    port = free_port()
    async with running(tmp_path, web_config(port, [a.address, b.address])) as (d, url):
        assert (
            await call("POST", f"{url}/api/v1/services/web/backends/{a.address}", {"weight": 0})
        )[0] == 200
        text = d.config_path.read_text()
        d.config_path.write_text(text.replace(f"      - {{address: '{a.address}'}}\n", ""))
        await d.reload()
        assert not d.controller.overrides
        d.config_path.write_text(text)
        await d.reload()
        assert {await read_line("127.0.0.1", port) for _ in range(4)} == {"A", "B"}


def test_environment_is_sane() -> None:
    assert os.environ.get("LB_ADMIN") is None, "LB_ADMIN would redirect the CLI tests"


async def test_cli_list_and_edits_against_a_running_lb(tmp_path: Path) -> None:
    from tests.support.proc import LbProcess, run_cli

    a, b = await TcpBackend("A").start(), await TcpBackend("B").start()
    port = free_port()
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(web_config(port, [a.address, b.address]))
    lb = await LbProcess.start(cfg)
    try:
        await lb.wait_event("lb.started")
        for _ in range(3):
            await read_line("127.0.0.1", port)
        code, out, err = await run_cli("list", "-n", "-c", str(cfg))
        assert code == 0, err
        lines = out.splitlines()
        assert lines[1].split() == ["Prot", "LocalAddress:Port", "Scheduler", "Flags", "Dataplane"]
        assert lines[2].split() == [
            "->",
            "RemoteAddress:Port",
            "Forward",
            "Weight",
            "ActiveConn",
            "InActConn",
            "State",
        ]
        assert lines[3].split() == ["TCP", f"127.0.0.1:{port}", "rr", "userspace"]
        assert lines[4].split() == ["->", b.address, "Proxy", "1", "0", "2", "UP"]
        assert lines[5].split() == ["->", a.address, "Proxy", "1", "0", "1", "UP"]
        assert "Kernel dataplane" not in out  # userspace only: no kernel path to speak of
        code, out, _ = await run_cli("list", "-n", "--stats", "-c", str(cfg))
        stats = out.splitlines()
        assert stats[1].split() == [
            "Prot",
            "LocalAddress:Port",
            "Conns",
            "InPkts",
            "OutPkts",
            "InBytes",
            "OutBytes",
            "Dataplane",
        ]
        assert stats[3].split()[:3] == ["TCP", f"127.0.0.1:{port}", "3"]
        code, out, _ = await run_cli("drain", "web", a.address, "-c", str(cfg))
        assert code == 0 and out.strip() == f"web {a.address}: DRAIN, weight 1 (effective 0)"
        code, out, _ = await run_cli("list", "-n", "-c", str(cfg))
        assert out.splitlines()[5].split() == ["->", a.address, "Proxy", "0", "0", "1", "DRAIN"]
        code, out, _ = await run_cli("set-weight", "web", a.address, "4", "-c", str(cfg))
        assert code == 0 and "weight 4 (effective 0)" in out
        code, out, _ = await run_cli("ready", "web", a.address, "-c", str(cfg))
        assert code == 0 and out.strip() == f"web {a.address}: UP, weight 4 (effective 4)"
        code, _, err = await run_cli("drain", "web", "10.9.9.9:1", "-c", str(cfg))
        assert code == 1 and "service web has no backend 10.9.9.9:1 (HTTP 404)" in err
        code, _, err = await run_cli("set-weight", "web", a.address, "70000", "-c", str(cfg))
        assert code == 2 and "out of range 0-65535" in err
    finally:
        await lb.stop()
    closed = free_port()
    code, _, err = await run_cli("list", "--admin", f"127.0.0.1:{closed}")
    assert code == 1 and f"cannot reach the admin API at http://127.0.0.1:{closed}" in err


async def test_access_log_and_throttled_connection_errors(tmp_path: Path) -> None:
    from tests.support.proc import LbProcess

    a = await TcpBackend("A").start()
    dead = free_port()
    port = free_port()
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(
        web_config(port, [f"127.0.0.1:{dead}", a.address], svc_extra="    access_log: true\n")
    )
    lb = await LbProcess.start(cfg)
    try:
        await lb.wait_event("lb.started")
        for _ in range(6):  # rr: half of them try the dead backend first, then retry on A
            assert await read_line("127.0.0.1", port) == "A"
        access = await lb.wait_event("access")
        assert (
            access["service"] == "web"
            and access["backend"] == a.address
            and access["end"] == "closed"
        )
        assert access["bytes_out"] == 2 and access["client"].startswith("127.0.0.1:")
        await eventually(lambda: sum(e.get("event") == "access" for e in lb.events) == 6)
        errors = [e for e in lb.events if e.get("event") == "connection.error"]
        assert len(errors) == 1  # three refusals, one event: no per-connection flood
        assert errors[0]["reason"] == "refused" and errors[0]["backend"] == f"127.0.0.1:{dead}"
    finally:
        await lb.stop()


def test_list_persistent_conn_shows_the_templates_per_backend() -> None:
    """`lb list --persistent-conn`: ipvsadm's PersistConn column, from the admin API's
    `persistent` count of each backend (whichever dataplane holds the templates)."""
    from lb.admin.listing import render

    backend = {"address": "10.0.1.1:80", "effective_weight": 1, "active": 2, "inactive": 0}
    service = {
        "name": "web",
        "protocol": "tcp",
        "listen": "10.0.0.1:80",
        "scheduler": "rr",
        "flags": [],
        "persistence": {"timeout": 300, "netmask": "255.255.255.255"},
        "dataplane": "ipvs",
        "backends": [{**backend, "persistent": 7, "state": "UP"}],
    }
    lines = render([service], numeric=True, persistent=True).splitlines()
    assert lines[2].split()[3:6] == ["Weight", "PersistConn", "ActiveConn"]
    assert lines[4].split() == ["->", "10.0.1.1:80", "Masq", "1", "7", "2", "0", "UP"]
    plain = render([service], numeric=True).splitlines()
    assert plain[4].split() == ["->", "10.0.1.1:80", "Masq", "1", "2", "0", "UP"]
