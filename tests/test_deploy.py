"""The manifests in deploy/ describe a node proxy that can work: the permissions it
needs and no more, the command it runs, a config lb's own loader accepts, probes on
paths the admin server serves, and an image with the tools it calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lb.admin.server import AdminServer, Readiness
from lb.config import parse_config
from lb.model import AdminSettings

DEPLOY = Path(__file__).parent.parent / "deploy"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def by_kind(name: str, kind: str) -> dict[str, Any]:
    [doc] = [d for d in docs(name) if d["kind"] == kind]
    return doc


def daemonset_pod() -> dict[str, Any]:
    spec: dict[str, Any] = by_kind("daemonset.yaml", "DaemonSet")["spec"]["template"]["spec"]
    return spec


def test_rbac_grants_read_of_services_slices_nodes_and_nothing_more() -> None:
    role = by_kind("rbac.yaml", "ClusterRole")
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    for key in (("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices")):
        assert grants.pop(key) == {"get", "list", "watch"}, key
    assert set(grants) == {("", "events"), ("events.k8s.io", "events")}
    assert all(verbs == {"create", "patch"} for verbs in grants.values())
    binding = by_kind("rbac.yaml", "ClusterRoleBinding")
    account = by_kind("rbac.yaml", "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "lb", "namespace": account["metadata"]["namespace"]}
    ]
    assert daemonset_pod()["serviceAccountName"] == account["metadata"]["name"]


def test_daemonset_runs_the_node_proxy_with_only_the_capabilities_it_needs() -> None:
    pod = daemonset_pod()
    assert pod["hostNetwork"] is True
    [lb] = pod["containers"]
    args = lb["args"]
    assert args[:3] == ["run", "-c", "/etc/lb/lb.yaml"]
    assert args[args.index("--source") + 1] == "kubernetes"
    sc = lb["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"}
    [init] = pod["initContainers"]
    assert init["securityContext"]["privileged"] is True  # modules and sysctls only
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in lb[
        "env"
    ]


def test_config_map_is_the_file_lb_reads_and_lb_accepts_it() -> None:
    pod = daemonset_pod()
    [lb] = pod["containers"]
    mount = next(m for m in lb["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    cm = by_kind("configmap.yaml", "ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    path = lb["args"][lb["args"].index("-c") + 1]
    assert path == f"{mount['mountPath']}/lb.yaml" and "lb.yaml" in cm["data"]
    config = parse_config(cm["data"]["lb.yaml"], "configmap lb.yaml")
    assert config.services_from == "kubernetes" and config.services == ()
    assert config.dataplane == "nftables"
    # the probes ask the admin API where the config puts it, on paths it serves
    admin = AdminServer(
        settings=AdminSettings(),
        controller=None,  # type: ignore[arg-type]  # only the route table is read
        metrics=None,  # type: ignore[arg-type]
        rates=None,  # type: ignore[arg-type]
        readiness=Readiness(),
        token=None,
    )
    served = {r.resource.canonical for r in admin.app().router.routes() if r.resource}
    for probe in ("readinessProbe", "livenessProbe"):
        get = lb[probe]["httpGet"]
        assert get["path"] in served
        assert (get["host"], get["port"]) == (str(config.admin.listen.ip), config.admin.listen.port)


def test_the_image_has_the_tools_the_node_proxy_calls() -> None:
    text = (Path(__file__).parent.parent / "Containerfile").read_text()
    runtime = text.rsplit("FROM ", 1)[1]
    for package in ("nftables", "iproute2", "conntrack", "kmod"):
        assert package in runtime, package
