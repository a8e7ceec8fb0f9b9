"""`lb run --source kubernetes --dataplane nftables` as a node proxy (needs root): cluster IPs
that are no address of the host, served by the kernel from client, balancer and backend
namespaces, with the API server double listening on the balancer namespace's loopback.
A Service the kernel cannot carry (lc) and a node port are served by userspace listeners;
churn, a 410 and an API outage keep the kernel in step or serving."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from offload.netns import inside
from tests.support.kube_double import FakeApiServer, endpoint, endpoint_slice, node, service
from tests.support.netns import BACKEND_IPS, CLIENT_IPS, LB_SIDE, Topology, socket_in
from tests.support.proc import LbProcess, run_cli
from tests.support.traffic import START, Backends, admin, ask

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

WEB_IP, LC_IP, NEW_IP = "10.96.0.10", "10.96.0.11", "10.96.0.12"
NODE_IP = "10.99.1.1"  # the balancer's address on the clients' side
NODE_PORT = 30080
CLIENT = CLIENT_IPS[0]


@pytest.fixture
async def api(topo: Topology) -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    await server.start(sock=_listener(topo))
    yield server
    await server.stop()


def _listener(topo: Topology, port: int = 0) -> socket.socket:
    """A listening socket on the balancer namespace's loopback, where lb looks for the API."""
    sock = socket_in(topo.lb)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def http(port: int, target: int = 8080) -> list[dict[str, Any]]:
    return [{"name": "http", "port": port, "targetPort": target, "protocol": "TCP"}]


def slice_for(name: str, *ips: str) -> dict[str, Any]:
    return endpoint_slice(
        f"{name}-x1",
        name,
        endpoints=[endpoint(ip) for ip in ips],
        ports=[{"name": "http", "port": 8080, "protocol": "TCP"}],
    )


async def answers(topo: Topology, vip: str, port: int = 80, n: int = 6) -> set[str]:
    return {await ask(topo, CLIENT, port=port, vip=vip) for _ in range(n)}


async def until(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.2)


def placements(services: dict[str, Any]) -> dict[str, str]:
    return {s["name"]: s["dataplane"] for s in services["services"]}


async def test_node_proxy_serves_cluster_ips_from_nftables_through_churn_410_and_outage(
    topo: Topology, backends: Backends, api: FakeApiServer, tmp_path: Path
) -> None:
    b1, b2, b3 = BACKEND_IPS[:3]
    api.put(node("node-1", NODE_IP))
    api.put(service("web", cluster_ip=WEB_IP, ports=http(80)))
    nodeport = [dict(http(80)[0], nodePort=NODE_PORT)]
    api.put(service("np", cluster_ip="10.96.0.20", ports=nodeport, type="NodePort"))
    api.put(service("lc", cluster_ip=LC_IP, ports=http(80), annotations={"lb.io/scheduler": "lc"}))
    api.put(slice_for("web", b1, b2))
    api.put(slice_for("np", b3))
    api.put(slice_for("lc", b3))
    kubeconfig = tmp_path / "kubeconfig"
    api.write_kubeconfig(kubeconfig)
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(
        "dataplane: nftables\nshutdown_grace: 1s\nadmin: {listen: 127.0.0.1:9090}\n"
        "kubernetes: {min_sync_period: 100ms, sync_period: 5s}\n"
    )
    args = ["--source", "kubernetes", "--kubeconfig", str(kubeconfig)]
    lb = await LbProcess.start(
        cfg, prefix=["ip", "netns", "exec", topo.lb], args=[*args, "--hostname-override", "node-1"]
    )
    try:
        await lb.wait_event("k8s.first_sync", timeout=START)
        services = await admin(topo, lb, "GET", "/api/v1/services")
        assert placements(services) == {
            "default/web:http": "nftables",
            "default/np:http": "nftables",
            f"default/np:http@{NODE_IP}:{NODE_PORT}": "userspace",  # on the veth: not lb0's
            "default/lc:http": "userspace",  # lc: not expressible in nftables
        }
        # the kernel DNATs: the backend sees the client itself
        assert await answers(topo, WEB_IP) == {f"{b1} saw {CLIENT}", f"{b2} saw {CLIENT}"}
        # userspace proxies: the backend sees the balancer
        assert await answers(topo, LC_IP) == {f"{b3} saw {LB_SIDE}"}
        assert await answers(topo, NODE_IP, port=NODE_PORT) == {f"{b3} saw {LB_SIDE}"}

        # churn: a pod goes, a Service comes
        api.put(slice_for("web", b2))
        api.put(service("new", cluster_ip=NEW_IP, ports=http(80)))
        api.put(slice_for("new", b1))

        async def churned() -> bool:
            return await answers(topo, WEB_IP) == {f"{b2} saw {CLIENT}"}

        await until(churned, "the kernel follows the EndpointSlice")

        async def new_served() -> bool:
            # the new Service and its slice may come in a later sync than the web slice
            # (until then its cluster IP is unreachable, or has no endpoint yet)
            try:
                return await answers(topo, NEW_IP) == {f"{b1} saw {CLIENT}"}
            except OSError:
                return False

        await until(new_served, "the new Service is programmed")

        # 410: every watch expired and the history compacted; lb re-lists, loses nothing
        api.put(slice_for("web", b1, b2, b3))
        api.compact()
        api.expire_watches()
        await lb.wait_event("k8s.relist", timeout=20)

        async def relisted() -> bool:
            return len(await answers(topo, WEB_IP, n=9)) == 3

        await until(relisted, "the state after the 410 is programmed")

        # the API goes away: the kernel keeps serving the last known state
        await api.stop()
        await lb.wait_event("k8s.unavailable", timeout=20)
        assert len(await answers(topo, WEB_IP, n=9)) == 3
        assert await answers(topo, NEW_IP) == {f"{b1} saw {CLIENT}"}
        code, out, err = await run_cli(
            "list", "-n", "--admin", "127.0.0.1:9090", prefix=["ip", "netns", "exec", topo.lb]
        )
        assert code == 0, err
        assert f"TCP  {WEB_IP}:80 rr" in out and "nftables" in out
        # back, compacted meanwhile: lb catches up
        api.compact()
        api.put(slice_for("web", b3))
        await api.start(sock=_listener(topo, api.port))

        async def caught_up() -> bool:
            return await answers(topo, WEB_IP) == {f"{b3} saw {CLIENT}"}

        await until(caught_up, "lb catches up with the API after the outage")
        metrics = await admin_text(topo, "/metrics")
        assert "lb_kubernetes_sync_duration_seconds_count" in metrics
    finally:
        await lb.stop()


async def admin_text(topo: Topology, path: str) -> str:
    with inside(topo.lb):
        sock = socket.create_connection(("127.0.0.1", 9090))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return raw.split(b"\r\n\r\n", 1)[1].decode()
