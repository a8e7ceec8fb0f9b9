"""The container image, built from the Containerfile (once per run, on a base made locally
by scripts/image) and run with podman (root): its contents and version; lb in it as a
sidecar (the image's own user and command, a userspace config, traffic from a client in
another namespace); and as the node proxy, run exactly as deploy/daemonset.yaml says (the
init container's modules and sysctls, then lb's command line, capabilities, mounts and
probes, read from the manifest), against the Kubernetes API double, serving a cluster IP
from the kernel (nftables) in the node's namespace, and gone without a trace on SIGTERM."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lb import __version__
from offload.netns import inside
from tests.support.image import (
    Image,
    Node,
    build_image,
    daemonset_pod,
    podman,
    podman_args,
    project_version,
    require_podman,
    running,
    volume_sources,
)
from tests.support.kube_double import (
    FakeApiServer,
    endpoint,
    endpoint_slice,
    node,
    self_signed_cert,
    service,
)
from tests.support.netns import BACKEND_IPS, CLIENT_IPS, LB_SIDE, Topology, run_in, socket_in
from tests.support.traffic import Backends, ask

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(900)]

CLIENT = CLIENT_IPS[0]
NODE_IP = "10.99.1.1"  # the node's (the balancer namespace's) address on the clients' side
CLUSTER_IP = "10.96.0.10"
START = 60.0  # lb's start in a container, and its first sync
LB_TABLE = re.compile(r"^table \S+ lb(_\d+)?$", re.M)  # lb's nftables tables


@pytest.fixture(scope="session")
def image() -> Image:
    """The image, built once per run; podman's layer cache makes an unchanged tree's
    rebuild take seconds."""
    require_podman()
    return build_image()


def in_image(image: Image, *cmd: str) -> str:
    """Run a command in the image (its entrypoint replaced): its standard output."""
    out = podman("run", "--rm", "--network", "none", "--entrypoint", cmd[0], image.tag, *cmd[1:])
    assert out.returncode == 0, out.stderr
    return out.stdout


# --- what the image is ----------------------------------------------------------------------


def test_lb_version_and_the_image_label_are_the_packages_version(image: Image) -> None:
    version = project_version()
    assert image.inspect()["Labels"]["org.opencontainers.image.version"] == version
    assert in_image(image, "lb", "--version").strip() == f"lb {version}"
    assert __version__ == version  # what the suite's own lb reports
    # the manifests name this version of the image, in both containers
    pod = daemonset_pod()
    for c in [*pod["initContainers"], *pod["containers"]]:
        assert c["image"].rsplit(":", 1)[1] == version, c["name"]


def test_the_image_has_the_tools_lb_calls_runs_unprivileged_and_nothing_to_build_with(
    image: Image,
) -> None:
    config = image.inspect()["Config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["lb"]
    assert config["Cmd"] == ["run", "-c", "/etc/lb/lb.yaml"]
    assert config["StopSignal"] == "SIGTERM"
    wanted = ["nft", "ip", "conntrack", "ipvsadm", "modprobe", "sysctl"]
    tools = in_image(image, "sh", "-c", f"for t in {' '.join(wanted)}; do command -v $t; done")
    assert [Path(t).name for t in tools.split()] == wanted, tools
    assert in_image(image, "id", "-u").strip() == "65532"
    # the build stage's tools stay there: no pip, no setuptools, no compiler
    venv = in_image(image, "ls", "/opt/lb/bin", "/opt/lb/lib/python3.11/site-packages").split()
    assert not [f for f in venv if f.startswith(("pip", "setuptools"))], venv
    assert in_image(image, "sh", "-c", "for c in gcc cc; do command -v $c; done; true") == ""
    # the bundled demo config is valid
    assert "ok" in in_image(image, "lb", "check", "-c", "/etc/lb/lb.yaml").lower()
    size = image.inspect()["Size"]
    assert size < 300e6, f"the image grew to {size / 1e6:.0f} MB"


# --- as a sidecar ---------------------------------------------------------------------------


def http_get(ns: str, host: str, port: int, path: str) -> tuple[int, str]:
    """GET over HTTP/1.0 from inside namespace `ns` (as the kubelet's probes would)."""
    with inside(ns):
        sock = socket.create_connection((host, port), timeout=5)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


SIDECAR_CONFIG = f"""\
dataplane: userspace
shutdown_grace: 2s
admin: {{listen: 127.0.0.1:9090}}
services:
  - name: web
    listen: {NODE_IP}:8080
    scheduler: rr
    backends: [{{address: "{BACKEND_IPS[0]}:8080"}}, {{address: "{BACKEND_IPS[1]}:8080"}}]
"""


async def test_as_a_sidecar_lb_serves_as_the_images_own_user_with_nothing_granted(
    image: Image, topo: Topology, backends: Backends, tmp_path: Path
) -> None:
    """The image's user, entrypoint and command; a userspace config in place of the demo;
    the strictest pod (Kubernetes' "restricted" profile: every capability dropped, no
    privilege escalation, read-only root)."""
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(SIDECAR_CONFIG)
    cfg.chmod(0o644)
    options = [
        "--network", f"ns:/run/netns/{topo.lb}",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--read-only", "--read-only-tmpfs=false",
        "--volume", f"{cfg}:/etc/lb/lb.yaml:ro",
        image.tag,
    ]  # fmt: skip
    async with running(f"lbtest-sidecar-{topo.tag}", options) as c:
        started = await c.lb.wait_event("lb.started", timeout=START)
        assert started["admin"] == "127.0.0.1:9090"
        b1, b2 = BACKEND_IPS[:2]
        answers = {await ask(topo, CLIENT, port=8080, vip=NODE_IP) for _ in range(4)}
        assert answers == {f"{b1} saw {LB_SIDE}", f"{b2} saw {LB_SIDE}"}  # proxied
        status, _ = await asyncio.to_thread(http_get, topo.lb, "127.0.0.1", 9090, "/readyz")
        assert status == 200
        ps = podman("top", c.name, "user", "args")
        assert ps.returncode == 0 and "65532" in ps.stdout, ps
        code, took = await c.stop(grace=10)
        assert code == 0, c.lb.lines[-10:]
        assert took < 8
        await c.lb.wait_event("lb.stopped", timeout=1)


# --- as the node proxy ----------------------------------------------------------------------


@pytest.fixture
async def api(topo: Topology, tmp_path: Path) -> AsyncIterator[tuple[FakeApiServer, Path]]:
    """The API double over HTTPS on the node namespace's loopback, and a service account
    directory for it (token, ca.crt, namespace), as the kubelet mounts one."""
    account = tmp_path / "serviceaccount"
    account.mkdir(mode=0o755)
    key = tmp_path / "key.pem"
    self_signed_cert(account / "ca.crt", key)
    server = FakeApiServer()
    (account / "token").write_text(server.token or "")
    (account / "namespace").write_text("kube-system")
    for f in account.iterdir():
        f.chmod(0o644)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(account / "ca.crt", key)
    sock = socket_in(topo.lb)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    await server.start(sock=sock, tls=tls)
    yield server, account
    await server.stop()


def init_container(
    image: Image, topo: Topology, volumes: dict[str, Path]
) -> subprocess.CompletedProcess[str]:
    """The DaemonSet's init container, run to its end in the node's namespace."""
    [init] = daemonset_pod()["initContainers"]
    return podman(
        "run", "--rm", *podman_args(init, Node(netns=topo.lb, volumes=volumes), image.tag)
    )


def test_the_init_container_sets_the_sysctls_in_the_nodes_namespace(
    image: Image, topo: Topology, tmp_path: Path
) -> None:
    run_in(topo, "sysctl", "-qw", "net.ipv4.ip_forward=0")  # a new namespace may inherit 1
    out = init_container(image, topo, volume_sources(daemonset_pod(), tmp_path))
    assert out.returncode == 0, out.stderr
    # every command it calls is in the image (a module may be built in, or absent here)
    assert not re.search(r"sh: \d+: \S+: not found", out.stderr), out.stderr
    assert "net.ipv4.ip_forward = 1" in out.stdout
    assert run_in(topo, "sysctl", "-n", "net.ipv4.ip_forward").strip() == "1"


async def test_as_the_node_proxy_lb_serves_a_cluster_ip_from_the_kernel_and_leaves_nothing(
    image: Image,
    topo: Topology,
    backends: Backends,
    api: tuple[FakeApiServer, Path],
    tmp_path: Path,
) -> None:
    server, account = api
    b1, b2 = BACKEND_IPS[:2]
    server.put(node("node-1", NODE_IP))
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
    server.put(service("web", cluster_ip=CLUSTER_IP, ports=ports))
    slice_ports = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    server.put(
        endpoint_slice("web-x1", "web", endpoints=[endpoint(b1), endpoint(b2)], ports=slice_ports)
    )
    pod = daemonset_pod()
    volumes = volume_sources(pod, tmp_path)
    out = init_container(image, topo, volumes)  # the pod's init container, first
    assert out.returncode == 0, out.stderr

    [lb] = pod["containers"]
    n = Node(
        netns=topo.lb,
        name="node-1",
        volumes=volumes,
        service_account=account,
        # the values deploy/daemonset.yaml leaves to the user: where the API server is
        env={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.port)},
    )
    options = podman_args(lb, n, image.tag)
    probes: dict[str, Any] = {p: lb[p]["httpGet"] for p in ("readinessProbe", "livenessProbe")}
    async with running(f"lbtest-node-{topo.tag}", options) as c:
        await c.lb.wait_event("k8s.first_sync", timeout=START)
        assert server.requests, "lb never reached the API"
        for name, get in probes.items():
            status, body = await asyncio.to_thread(
                http_get, topo.lb, get["host"], get["port"], get["path"]
            )
            assert status == 200, (name, body)
        # the kernel DNATs: the backend sees the client itself, not lb
        answers = {await ask(topo, CLIENT, port=80, vip=CLUSTER_IP) for _ in range(6)}
        assert answers == {f"{b1} saw {CLIENT}", f"{b2} saw {CLIENT}"}
        assert LB_TABLE.search(run_in(topo, "nft", "list", "tables"))
        # the capabilities are exactly the manifest's
        caps = podman("inspect", c.name, "--format", "{{json .EffectiveCaps}}")
        added = sorted(lb["securityContext"]["capabilities"]["add"])
        assert caps.stdout.strip() == '["' + '","'.join(f"CAP_{a}" for a in added) + '"]'

        # SIGTERM, as the kubelet sends it: a clean exit, well within the grace period
        grace = pod["terminationGracePeriodSeconds"]
        code, took = await c.stop(grace=grace)
        assert code == 0, c.lb.lines[-10:]
        assert took < grace / 2, took
        await c.lb.wait_event("lb.stopped", timeout=1)
    tables = run_in(topo, "nft", "list", "tables")
    assert not LB_TABLE.search(tables), tables
    assert "lb0" not in run_in(topo, "ip", "link", "show")
