"""The manifests in deploy/ describe a node proxy that can work: the permissions it
needs and no more, a command line lb's parser accepts, a config lb's own loader
accepts, probes on paths the admin server serves, the modules and sysctls lb cannot set
itself from an unprivileged container, and an image with the tools it calls."""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client import models

import offload.host
from lb.admin.server import AdminServer, Readiness
from lb.cli import build_parser
from lb.config import parse_config
from lb.k8s.api import Api
from lb.model import AdminSettings, Config
from offload.host import IPVS_SYSCTLS, NFT_SYSCTLS, Host

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def by_kind(name: str, kind: str) -> dict[str, Any]:
    [doc] = [d for d in docs(name) if d["kind"] == kind]
    return doc


def daemonset_pod() -> dict[str, Any]:
    spec: dict[str, Any] = by_kind("daemonset.yaml", "DaemonSet")["spec"]["template"]["spec"]
    return spec


def lb_container() -> dict[str, Any]:
    [lb] = daemonset_pod()["containers"]
    assert isinstance(lb, dict)
    return lb


def init_script() -> str:
    [init] = daemonset_pod()["initContainers"]
    command = init["command"]
    assert command[:2] == ["sh", "-c"]
    script = command[2]
    assert isinstance(script, str)
    return script


def configmap_config() -> Config:
    cm = by_kind("configmap.yaml", "ConfigMap")
    return parse_config(cm["data"]["lb.yaml"], "deploy/configmap.yaml lb.yaml")


def grants() -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, over every rule of the ClusterRole."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in by_kind("rbac.yaml", "ClusterRole")["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no resourceNames etc.
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def check_fields(value: object, openapi_type: str, at: str) -> None:
    """`value` has only fields the Kubernetes API knows, of the right JSON type (the
    model classes of kubernetes-asyncio carry the API's schema): a misspelt field is
    rejected by `kubectl apply` (strict field validation), or silently dropped."""
    t = openapi_type
    if t.startswith("list["):
        assert isinstance(value, list), at
        for i, item in enumerate(value):
            check_fields(item, t[5:-1], f"{at}[{i}]")
    elif t.startswith("dict("):
        assert isinstance(value, dict), at
        for key, item in value.items():
            check_fields(item, t[5:-1].split(", ", 1)[1], f"{at}.{key}")
    elif t in ("str", "int", "bool"):
        assert type(value) is {"str": str, "int": int, "bool": bool}[t], (at, value)
    elif t != "object":  # object: int-or-string, quantities and the like
        model = getattr(models, t)
        assert isinstance(value, dict), at
        fields = {name: model.openapi_types[attr] for attr, name in model.attribute_map.items()}
        for key, item in value.items():
            assert key in fields, f"{at}.{key}: not a field of {t}"
            check_fields(item, fields[key], f"{at}.{key}")


@pytest.mark.parametrize("name", ["rbac.yaml", "configmap.yaml", "daemonset.yaml"])
def test_every_field_is_one_the_api_knows(name: str) -> None:
    for doc in docs(name):
        assert doc["apiVersion"] in ("v1", "apps/v1", "rbac.authorization.k8s.io/v1")
        check_fields(doc, "V1" + doc["kind"], f"{name} {doc['kind']}")


# --- RBAC -------------------------------------------------------------------------------


def test_rbac_grants_read_of_services_slices_nodes_and_events_only() -> None:
    g = grants()
    for key in (("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices")):
        assert g.pop(key) == {"get", "list", "watch"}, key  # no create/update/patch/delete
    assert g == {
        ("", "events"): {"create", "patch"},
        ("events.k8s.io", "events"): {"create", "patch"},
    }


def test_rbac_binds_the_role_to_the_account_the_daemonset_runs_as() -> None:
    role = by_kind("rbac.yaml", "ClusterRole")
    account = by_kind("rbac.yaml", "ServiceAccount")
    binding = by_kind("rbac.yaml", "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]
    ds = by_kind("daemonset.yaml", "DaemonSet")
    assert ds["metadata"]["namespace"] == account["metadata"]["namespace"] == "kube-system"
    assert daemonset_pod()["serviceAccountName"] == account["metadata"]["name"]


def test_rbac_covers_every_resource_lbs_kubernetes_client_lists_and_watches() -> None:
    """From lb/k8s/api.py itself: a resource lb starts reading needs a rule here."""
    groups = {"CoreV1Api": "", "DiscoveryV1Api": "discovery.k8s.io"}

    async def resources() -> list[tuple[str, str]]:
        api = Api(client.ApiClient(client.Configuration()))
        try:
            return [
                (groups[type(r.call.__self__).__name__], r.kind.lower() + "s")  # type: ignore[attr-defined]
                for r in (api.services, api.endpoint_slices, api.node("node-1"))
            ]
        finally:
            await api.close()

    g = grants()
    for key in asyncio.run(resources()):
        assert {"list", "watch"} <= g.get(key, set()), key


# --- the DaemonSet ----------------------------------------------------------------------


def test_daemonset_runs_on_every_node_in_the_host_network() -> None:
    ds = by_kind("daemonset.yaml", "DaemonSet")
    pod = daemonset_pod()
    assert pod["hostNetwork"] is True
    # the node's resolver: the cluster DNS is a Service, which lb itself serves once synced
    assert pod["dnsPolicy"] == "Default"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # SIGTERM: lb waits shutdown_grace for open connections; the kubelet must wait longer
    assert pod["terminationGracePeriodSeconds"] > configmap_config().shutdown_grace
    [init] = pod["initContainers"]
    assert init["image"] == lb_container()["image"]


def test_lb_runs_the_node_proxy_command_its_parser_accepts() -> None:
    lb = lb_container()
    assert "command" not in lb  # the args go to the image's entrypoint, `lb`
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", (ROOT / "Containerfile").read_text(), re.M)
    assert entrypoint is not None and yaml.safe_load(entrypoint.group(1)) == ["lb"]
    args = build_parser().parse_args(lb["args"])
    assert args.command == "run" and args.source == "kubernetes"
    assert args.kubeconfig is None  # in-cluster: the service account
    assert args.hostname_override is None  # the node name: $NODE_NAME
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in lb[
        "env"
    ]


def test_lb_reaches_the_api_server_itself_not_the_service_it_would_serve() -> None:
    """In-cluster, kubernetes-asyncio connects to $KUBERNETES_SERVICE_HOST:PORT, which the
    kubelet sets to the `kubernetes` Service's cluster IP: with kube-proxy gone nothing
    serves it before lb's own first sync. The manifest sets both, for the user to fill in
    (tests/test_image.py sets them to the API double's address)."""
    env = {e["name"]: e for e in lb_container()["env"]}
    assert env["KUBERNETES_SERVICE_HOST"]["value"].startswith("SET-ME")
    assert int(env["KUBERNETES_SERVICE_PORT"]["value"]) == 6443  # a string, as env values are


def test_lb_is_unprivileged_with_only_the_capabilities_it_needs() -> None:
    sc = lb_container()["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0  # the capabilities are effective for uid 0 only
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW"]
    resources = lb_container()["resources"]
    assert resources == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"memory": "512Mi"},
    }
    volumes = {v["name"]: v for v in daemonset_pod()["volumes"]}
    for mount in lb_container()["volumeMounts"]:
        assert mount["readOnly"] is True, mount
        if "hostPath" in volumes[mount["name"]]:
            assert mount["mountPath"] == "/lib/modules"


def test_the_init_container_sets_every_sysctl_lb_would_write_itself() -> None:
    """lb's Host.setup writes a sysctl only when it differs, and /proc/sys is read-only in
    the unprivileged container: each one must already be set, for nftables and IPVS."""
    [init] = daemonset_pod()["initContainers"]
    assert init["securityContext"]["privileged"] is True
    assert init["securityContext"]["runAsUser"] == 0
    script = init_script()
    assert script.lstrip().startswith("set -e")  # ip_forward failing fails the pod
    set_here: dict[str, str] = {}
    required: set[str] = set()
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["sysctl", "-w"]:
            key, _, value = words[2].partition("=")
            set_here[key.replace(".", "/")] = value
            if "||" not in words:
                required.add(key.replace(".", "/"))
    for key, value in IPVS_SYSCTLS.items():
        assert set_here.get(key) == value, key
    assert set(NFT_SYSCTLS) <= required  # the nftables dataplane cannot work without them
    # see daemonset.yaml: lb needs no 127/8 routing, and it would expose loopback listeners
    assert not any("route_localnet" in key for key in set_here)


def test_the_init_container_loads_every_module_lb_would_load_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without CAP_SYS_MODULE lb's own modprobe fails (quietly): the init container's must
    have loaded them."""
    asked: list[str] = []

    async def run(*cmd: str, stdin: str | None = None) -> tuple[int, str]:
        asked.extend(cmd[1:])
        return 0, ""

    monkeypatch.setattr(offload.host, "_run", run)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/sbin/{name}")
    asyncio.run(Host.__new__(Host).load_modules())
    assert asked
    loaded: set[str] = set()
    for line in init_script().splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["modprobe", "-a"]:
            loaded.update(w for w in words[2:] if w not in ("||", "true"))
    assert set(asked) <= loaded
    assert {"ip_vs_rr", "ip_vs_wrr", "ip_vs_sh"} <= loaded  # kube-proxy's IPVS schedulers
    mounts = {m["name"]: m for m in daemonset_pod()["initContainers"][0]["volumeMounts"]}
    modules = next(v for v in daemonset_pod()["volumes"] if v["name"] in mounts)
    assert modules["hostPath"]["path"] == "/lib/modules"
    assert mounts[modules["name"]] == {
        "name": modules["name"],
        "mountPath": "/lib/modules",
        "readOnly": True,
    }


# --- the ConfigMap and the probes -------------------------------------------------------


def test_the_config_map_is_the_file_lb_reads() -> None:
    pod = daemonset_pod()
    lb = lb_container()
    cm = by_kind("configmap.yaml", "ConfigMap")
    assert cm["metadata"] == {"name": "lb-config", "namespace": "kube-system"}
    volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    mount = next(m for m in lb["volumeMounts"] if m["name"] == volume["name"])
    path = build_parser().parse_args(lb["args"]).config
    assert path == f"{mount['mountPath']}/lb.yaml"
    assert "items" not in volume["configMap"]  # every key is a file named after it
    assert list(cm["data"]) == ["lb.yaml"]


def test_lbs_loader_accepts_the_config_map() -> None:
    config = configmap_config()
    assert config.source == "kubernetes" and config.services == ()
    assert config.dataplane == "nftables"
    assert config.offload.device == "lb0"
    assert str(config.admin.listen) == "127.0.0.1:10249"
    k = config.kubernetes
    assert (k.min_sync_period, k.sync_period, k.default_scheduler) == (0.5, 30.0, "rr")


def test_the_probes_ask_lb_on_paths_it_serves() -> None:
    """Readiness: the admin API's /readyz (after the first sync). Liveness: kube-proxy's
    /livez on the health server (`kubernetes.healthz_address`)."""
    config = configmap_config()
    admin = AdminServer(
        settings=AdminSettings(),
        controller=None,  # type: ignore[arg-type]  # only the route table is read
        metrics=None,  # type: ignore[arg-type]
        rates=None,  # type: ignore[arg-type]
        readiness=Readiness(),
        token=None,
    )
    served = {
        r.resource.canonical
        for r in admin.app().router.routes()
        if r.resource and r.method == "GET"
    }
    lb = lb_container()
    ready = lb["readinessProbe"]["httpGet"]
    # host network: the kubelet reaches lb's loopback listener on the node
    assert ready["path"] == "/readyz" and ready["path"] in served
    assert (ready["host"], ready["port"]) == (str(config.admin.listen.ip), config.admin.listen.port)
    live = lb["livenessProbe"]["httpGet"]
    healthz = config.kubernetes.healthz_address
    assert healthz is not None and healthz.ip.is_unspecified  # reachable on 127.0.0.1 too
    assert (live["path"], live["port"]) == ("/livez", healthz.port)


# --- the image --------------------------------------------------------------------------


def test_the_image_has_the_tools_the_node_proxy_calls() -> None:
    build, runtime = (ROOT / "Containerfile").read_text().split("\nFROM ")[1:]
    installs = " ".join(re.findall(r"apt-get install ([^&\n]+)", runtime)).split()
    for package in ("nftables", "iproute2", "kmod", "procps", "conntrack", "ipvsadm"):
        assert package in installs, package
    assert "--no-install-recommends" in installs
    assert "rm -rf /var/lib/apt/lists/*" in runtime
    assert re.search(r"^USER 65532", runtime, re.M)  # the default stays unprivileged
    # the build stage copies what `pip install` reads and the packages lb runs
    copied = {w for line in re.findall(r"^COPY (.+)$", build, re.M) for w in line.split()}
    assert {"pyproject.toml", "README.md", "lb", "offload"} <= copied
    # the base is an argument whose default is the public image (tests/test_image.py builds
    # on a local one); the version label is an argument too, checked against `lb --version`
    assert re.search(
        r"^ARG BASE=docker\.io/library/python:3\.11-slim-bookworm$",
        ROOT.joinpath("Containerfile").read_text(),
        re.M,
    )
    assert 'org.opencontainers.image.version="${VERSION}"' in runtime
    assert re.search(
        r'^RUN test "\$\(/opt/lb/bin/lb --version\)" = "lb \$\{VERSION\}"', build, re.M
    )
