"""`lb run --source kubernetes` end to end: the real command, the real kubernetes-asyncio
client, an API server double on the real wire protocol, and real TCP traffic through the
balancer (userspace dataplane on loopback addresses, no root needed) while Services and
EndpointSlices churn, the API expires watches (410) and goes away."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.kube_double import (
    FakeApiServer,
    endpoint,
    endpoint_slice,
    node,
    self_signed_cert,
    service,
)
from tests.support.net import TcpBackend, free_port, read_line
from tests.support.proc import LbProcess, run_cli
from tests.support.root import require_root

pytestmark = pytest.mark.timeout(120)

CLUSTER_IP = "127.0.2.1"
NODE_IP = "127.0.0.1"
BACKENDS = ("127.0.1.1", "127.0.1.2")


def shared_port(hosts: tuple[str, ...]) -> int:
    """A port free on every one of these addresses (an EndpointSlice has one port)."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for h in hosts[1:]:
                with socket.socket() as s:
                    s.bind((h, port))
        except OSError:
            continue
        return port
    raise AssertionError("no shared free port")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Cluster:
    def __init__(self, api: FakeApiServer, target: int, port: int, node_port: int) -> None:
        self.api = api
        self.target = target
        self.port = port
        self.node_port = node_port

    def publish(self, *ips: str, **kw: Any) -> None:
        self.api.put(
            endpoint_slice(
                "web-7x2kq",
                "web",
                endpoints=[endpoint(ip, **kw) for ip in ips],
                ports=[{"name": "http", "port": self.target, "protocol": "TCP"}],
                trigger_time=now(),
            )
        )


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    api = FakeApiServer()
    await api.start()
    target = shared_port(BACKENDS)
    c = Cluster(api, target, free_port(CLUSTER_IP), free_port(NODE_IP))
    api.put(node("node-1", NODE_IP))
    api.put(node("node-2", "10.0.0.2"))
    ports = [
        {
            "name": "http",
            "port": c.port,
            "targetPort": "http-alt",  # named: the slice carries the number
            "protocol": "TCP",
            "nodePort": c.node_port,
        }
    ]
    api.put(service("web", cluster_ip=CLUSTER_IP, ports=ports, type="NodePort"))
    api.put(service("db", cluster_ip="None"))  # headless: ignored
    c.publish(*BACKENDS)
    yield c
    await api.stop()


@pytest.fixture
async def backends(cluster: Cluster) -> AsyncIterator[list[TcpBackend]]:
    bs = [
        await TcpBackend(name, host=h, port=cluster.target).start()
        for name, h in zip("ab", BACKENDS, strict=True)
    ]
    yield bs
    for b in bs:
        await b.stop()


def write_config(tmp_path: Path, admin_port: int, extra: str = "", kubernetes: str = "") -> Path:
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(
        f"dataplane: userspace\nshutdown_grace: 1s\nadmin: {{listen: 127.0.0.1:{admin_port}}}\n"
        f"kubernetes: {{min_sync_period: 100ms, sync_period: 5s{kubernetes}}}\n" + extra
    )
    return cfg


async def names(port: int, host: str = CLUSTER_IP, n: int = 8) -> set[str]:
    return {await read_line(host, port) for _ in range(n)}


async def get(admin_port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{admin_port}{path}") as r,
    ):
        return r.status, await r.text()


async def test_node_proxy_follows_the_api_through_churn_410_and_outage(
    cluster: Cluster, backends: list[TcpBackend], tmp_path: Path
) -> None:
    admin = free_port()
    kubeconfig = tmp_path / "kubeconfig"
    cluster.api.write_kubeconfig(kubeconfig)
    args = ["--source", "kubernetes", "--kubeconfig", str(kubeconfig)]
    lb = await LbProcess.start(
        write_config(tmp_path, admin), args=[*args, "--hostname-override", "node-1"]
    )
    try:
        await lb.wait_event("k8s.first_sync", timeout=30)
        assert (await get(admin, "/readyz"))[0] == 200
        # the cluster IP and the node port both reach both pods
        assert await names(cluster.port) == {"a", "b"}
        assert await names(cluster.node_port, host=NODE_IP) == {"a", "b"}

        # churn: a pod goes (unready), another comes back
        cluster.publish(BACKENDS[1])
        await asyncio.sleep(0.5)
        assert await names(cluster.port) == {"b"}

        # the API expires every watch and compacts: lb re-lists and misses nothing
        cluster.api.put(
            service(
                "extra",
                cluster_ip="127.0.2.9",
                ports=[
                    {"name": "http", "port": cluster.port, "targetPort": 8080, "protocol": "TCP"}
                ],
            )
        )
        cluster.api.compact()
        cluster.api.expire_watches()
        cluster.publish(*BACKENDS)
        await lb.wait_event("k8s.relist", timeout=10)
        await asyncio.sleep(0.5)
        assert await names(cluster.port) == {"a", "b"}
        listed = json.loads((await get(admin, "/api/v1/services"))[1])["services"]
        assert sorted(x["name"] for x in listed) == [
            "default/extra:http",  # added around the 410: not lost
            "default/web:http",
            f"default/web:http@{NODE_IP}:{cluster.node_port}",
        ]

        # the API goes away: traffic keeps flowing on the last known state
        api_port = int(cluster.api.url.rsplit(":", 1)[1])
        await cluster.api.stop()
        await lb.wait_event("k8s.unavailable", timeout=10)
        for _ in range(3):
            assert await names(cluster.port) == {"a", "b"}
            await asyncio.sleep(0.3)
        assert lb.proc.returncode is None

        # it comes back (with its history compacted meanwhile): lb catches up
        cluster.api.compact()
        await cluster.api.start(api_port)
        cluster.publish(BACKENDS[0])
        deadline = asyncio.get_running_loop().time() + 20
        while await names(cluster.port) != {"a"}:
            assert asyncio.get_running_loop().time() < deadline, lb.lines[-5:]
            await asyncio.sleep(0.3)

        status, text = await get(admin, "/metrics")
        assert status == 200
        count = next(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("lb_kubernetes_network_programming_duration_seconds_count")
        )
        assert count >= 3
        assert "lb_kubernetes_sync_duration_seconds_count" in text
        assert 'lb_kubernetes_api_errors_total{kind="Service",reason="gone"}' in text
    finally:
        lb.signal(signal.SIGTERM)
        assert await lb.wait() == 0
        await lb.stop()


async def test_not_ready_until_the_first_sync_and_the_gate_holds_without_the_api(
    tmp_path: Path,
) -> None:
    admin = free_port()
    kubeconfig = tmp_path / "kubeconfig"
    api = FakeApiServer()
    await api.start()
    api.write_kubeconfig(kubeconfig)
    await api.stop()  # configured, but not answering
    lb = await LbProcess.start(
        write_config(tmp_path, admin),
        args=["--source", "kubernetes", "--kubeconfig", str(kubeconfig)],
    )
    try:
        await lb.wait_event("lb.started", timeout=30)
        await lb.wait_event("k8s.unavailable", timeout=10)
        status, text = await get(admin, "/readyz")
        assert status == 503 and "Kubernetes" in text
        assert not [e for e in lb.events if e.get("event") == "k8s.first_sync"]
    finally:
        await lb.stop()


async def test_bad_kubernetes_settings_are_refused_with_the_reason(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, free_port())
    code, _, err = await run_cli(
        "run", "-c", str(cfg), "--source", "kubernetes", "--kubeconfig", str(tmp_path / "nope")
    )
    assert code == 1
    assert f"kubernetes: cannot use kubeconfig {tmp_path / 'nope'}" in err
    cfg = write_config(
        tmp_path, free_port(), "source: kubernetes\nservices:\n- {name: x, listen: 127.0.0.1:1}\n"
    )
    code, _, err = await run_cli("check", "-c", str(cfg))
    assert code == 2
    assert "services: must be empty with source: kubernetes" in err
    text = write_config(tmp_path, free_port()).read_text().replace("5s", "10ms")
    (tmp_path / "bad.yaml").write_text(text)
    code, _, err = await run_cli("check", "-c", str(tmp_path / "bad.yaml"))
    assert code == 2
    assert "kubernetes.min_sync_period: must not exceed sync_period (0.01s)" in err


SERVICE_ACCOUNT = Path("/run/secrets/kubernetes.io/serviceaccount")  # /var/run -> /run


@pytest.mark.netns
async def test_in_cluster_the_service_account_is_used_without_a_kubeconfig(
    cluster: Cluster, backends: list[TcpBackend], tmp_path: Path
) -> None:
    """As in a pod: no kubeconfig; $KUBERNETES_SERVICE_HOST/PORT, and the token and CA
    mounted at the service account's path (here in a mount namespace of lb's own, over
    an empty directory); the API over HTTPS with that CA, the token checked."""
    require_root()
    account = tmp_path / "account"
    account.mkdir()
    (account / "token").write_text(cluster.api.token or "")
    key = tmp_path / "key.pem"
    self_signed_cert(account / "ca.crt", key)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(account / "ca.crt", key)
    port = int(cluster.api.url.rsplit(":", 1)[1])
    await cluster.api.stop()
    await cluster.api.start(port, tls=tls)
    made = [p for p in (SERVICE_ACCOUNT, *SERVICE_ACCOUNT.parents) if not p.exists()]
    SERVICE_ACCOUNT.mkdir(parents=True, exist_ok=True)
    admin = free_port()
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env |= {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(port)}
    pod = [
        "env", "-i", *(f"{k}={v}" for k, v in env.items()),
        "unshare", "-m", "sh", "-c", f'mount --bind "$0" {SERVICE_ACCOUNT} && exec "$@"',
        str(account),
    ]  # fmt: skip
    lb = await LbProcess.start(
        write_config(tmp_path, admin),
        prefix=pod,
        args=["--source", "kubernetes", "--hostname-override", "node-1"],
    )
    try:
        await lb.wait_event("k8s.first_sync", timeout=30)
        assert await names(cluster.port) == {"a", "b"}
        assert cluster.api.requests, "lb never reached the API"
    finally:
        await lb.stop()
        for p in made:  # the empty directories this test made, deepest first
            with contextlib.suppress(OSError):
                p.rmdir()


async def test_health_check_node_port_and_proxy_health(
    cluster: Cluster, backends: list[TcpBackend], tmp_path: Path
) -> None:
    """kube-proxy's health servers: a Local Service's healthCheckNodePort answers 200 while
    this node has a ready endpoint of it and 503 once it has none; /healthz turns 503 when
    the node is tainted for deletion (/livez does not)."""
    admin, healthz, hc_port = free_port(), free_port(NODE_IP), free_port(NODE_IP)
    edge = service(
        "edge",
        cluster_ip="127.0.2.7",
        type="LoadBalancer",
        ports=[{"name": "http", "port": cluster.port, "targetPort": 8080, "protocol": "TCP"}],
    )
    edge["spec"] |= {"externalTrafficPolicy": "Local", "healthCheckNodePort": hc_port}
    cluster.api.put(edge)
    slice_ports = [{"name": "http", "port": cluster.target, "protocol": "TCP"}]

    def place(node_name: str) -> None:
        cluster.api.put(
            endpoint_slice(
                "edge-1",
                "edge",
                endpoints=[endpoint(BACKENDS[0], node_name=node_name)],
                ports=slice_ports,
            )
        )

    place("node-1")
    kubeconfig = tmp_path / "kubeconfig"
    cluster.api.write_kubeconfig(kubeconfig)
    cfg = write_config(tmp_path, admin, kubernetes=f", healthz_address: '{NODE_IP}:{healthz}'")
    args = ["--source", "kubernetes", "--kubeconfig", str(kubeconfig)]
    lb = await LbProcess.start(cfg, args=[*args, "--hostname-override", "node-1"])

    async def probe(port: int, path: str = "/") -> tuple[int, dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://{NODE_IP}:{port}{path}") as r,
        ):
            assert r.headers["Content-Type"].startswith("application/json")
            return r.status, await r.json()

    async def until(port: int, status: int, path: str = "/") -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                got, body = await probe(port, path)
                if got == status:
                    return body
            assert asyncio.get_running_loop().time() < deadline, lb.lines[-5:]
            await asyncio.sleep(0.2)

    try:
        await lb.wait_event("k8s.first_sync", timeout=30)
        body = await until(hc_port, 200)
        assert body == {
            "service": {"namespace": "default", "name": "edge"},
            "localEndpoints": 1,
            "serviceProxyHealthy": True,
        }
        place("node-2")  # the node's last local endpoint goes elsewhere
        assert (await until(hc_port, 503))["localEndpoints"] == 0
        place("node-1")
        assert (await until(hc_port, 200))["localEndpoints"] == 1

        assert (await until(healthz, 200, "/healthz"))["nodeEligible"] is True
        tainted = node("node-1", NODE_IP)
        tainted["spec"]["taints"] = [
            {"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}
        ]
        cluster.api.put(tainted)
        assert (await until(healthz, 503, "/healthz"))["nodeEligible"] is False
        assert (await probe(healthz, "/livez"))[0] == 200  # alive all the same

        cluster.api.delete("Service", "default", "edge")  # its port closes with it
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            try:
                await probe(hc_port)
            except aiohttp.ClientConnectionError:
                break
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.2)
    finally:
        lb.signal(signal.SIGTERM)
        assert await lb.wait() == 0
        await lb.stop()
