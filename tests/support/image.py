"""lb's container image for tests: built by scripts/image (which holds podman's settings
for these machines), and its containers run as the kubelet would run those of
deploy/daemonset.yaml: the pod's volumes, environment, security context and command,
translated to `podman run` options, with the node's network namespace a test's.

The translation refuses any field of a container it does not know, so a change to the
DaemonSet cannot pass the image tests untested.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
import tomllib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.proc import LbProcess
from tests.support.root import CI, require_root

ROOT = Path(__file__).parent.parent.parent
SCRIPT = ROOT / "scripts" / "image"
DEPLOY = ROOT / "deploy"
#: Where the kubelet mounts a pod's service account (token, ca.crt, namespace).
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def podman(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """`podman ARGS` with this machine's settings (scripts/image podman); never raises on
    a failed command: the caller looks at returncode."""
    return subprocess.run(
        [str(SCRIPT), "podman", *args], capture_output=True, text=True, timeout=timeout
    )


def require_podman() -> None:
    """Root, podman and debootstrap (scripts/setup installs them): skipped on a laptop
    without them, failed on CI."""
    require_root()
    missing = [t for t in ("podman", "runc", "debootstrap") if shutil.which(t) is None]
    if missing:
        message = f"the image tests need {', '.join(missing)} (scripts/setup installs them)"
        if CI:
            pytest.fail(message + ", and CI=true forbids skipping them")
        pytest.skip(message)


def project_version() -> str:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert isinstance(version, str)
    return version


@dataclass
class Image:
    tag: str
    base: str
    seconds: float  # how long `scripts/image build` took, base included

    def inspect(self) -> dict[str, Any]:
        out = podman("image", "inspect", self.tag)
        assert out.returncode == 0, out.stderr
        [info] = json.loads(out.stdout)
        assert isinstance(info, dict)
        return info


def script(*args: str) -> str:
    """scripts/image ARGS: the last line it prints (the image's name)."""
    out = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=900, check=False
    )
    assert out.returncode == 0, f"scripts/image {' '.join(args)}:\n{out.stderr[-5000:]}"
    return out.stdout.strip().splitlines()[-1]


def build_image() -> Image:
    """The base (made once, then kept: its tag names its recipe) and the lb image on it,
    through podman's layer cache: seconds when the tree has not changed."""
    start = time.monotonic()
    base = script("base")
    tag = script("build", f"localhost/lb:{project_version()}")
    return Image(tag=tag, base=base, seconds=time.monotonic() - start)


# --- deploy/ as the kubelet reads it --------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    return [
        d
        for path in sorted(DEPLOY.glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]


def daemonset_pod() -> dict[str, Any]:
    [ds] = [d for d in manifests() if d["kind"] == "DaemonSet"]
    spec: dict[str, Any] = ds["spec"]["template"]["spec"]
    return spec


def volume_sources(pod: Mapping[str, Any], workdir: Path) -> dict[str, Path]:
    """Each volume of the pod as a host path: a hostPath as it is, a ConfigMap of deploy/
    as a directory of one file per key (world-readable, as the kubelet writes them)."""
    configmaps = {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "ConfigMap"}
    out: dict[str, Path] = {}
    for volume in pod["volumes"]:
        name = volume["name"]
        if "hostPath" in volume:
            out[name] = Path(volume["hostPath"]["path"])
        elif "configMap" in volume:
            directory = workdir / f"configmap-{name}"
            directory.mkdir(mode=0o755)
            for key, text in configmaps[volume["configMap"]["name"]]["data"].items():
                (directory / key).write_text(text)
                (directory / key).chmod(0o644)
            out[name] = directory
        else:
            raise AssertionError(f"volume {name}: a kind the tests cannot provide: {volume}")
    return out


#: The fields of a container (and of its securityContext) `podman_args` translates; the
#: probes and resource requests are the test's or the scheduler's business.
CONTAINER_FIELDS = {
    "name", "image", "command", "args", "env", "securityContext", "volumeMounts",
    "resources", "readinessProbe", "livenessProbe",
}  # fmt: skip
SECURITY_FIELDS = {
    "privileged", "runAsUser", "runAsNonRoot", "allowPrivilegeEscalation",
    "readOnlyRootFilesystem", "capabilities",
}  # fmt: skip


@dataclass
class Node:
    """What the kubelet supplies on a node: its network namespace (the pod has
    hostNetwork), its name (the downward API's spec.nodeName), the pod's volumes, the
    service account's directory, and the values of environment variables the manifest
    leaves for the user to set."""

    netns: str
    name: str = "node-1"
    volumes: dict[str, Path] = field(default_factory=dict)
    service_account: Path | None = None
    env: dict[str, str] = field(default_factory=dict)


def podman_args(container: Mapping[str, Any], node: Node, image: str) -> list[str]:
    """`podman run` options, image, command and arguments for a container of the pod."""
    unknown = set(container) - CONTAINER_FIELDS
    assert not unknown, f"container {container['name']}: untranslated fields {unknown}"
    opts = ["--network", f"ns:/run/netns/{node.netns}"]
    sc = container.get("securityContext", {})
    unknown = set(sc) - SECURITY_FIELDS
    assert not unknown, f"container {container['name']}: untranslated securityContext {unknown}"
    if sc.get("privileged"):
        opts.append("--privileged")
    if "runAsUser" in sc:
        opts += ["--user", str(sc["runAsUser"])]
    if sc.get("runAsNonRoot"):
        raise AssertionError("runAsNonRoot: the kubelet's check is not translated")
    if sc.get("allowPrivilegeEscalation") is False:
        opts += ["--security-opt", "no-new-privileges"]
    if sc.get("readOnlyRootFilesystem"):
        opts += ["--read-only", "--read-only-tmpfs=false"]  # no /tmp or /run: none in a pod
    caps = sc.get("capabilities", {})
    for cap in caps.get("drop", []):
        opts += ["--cap-drop", cap]
    for cap in caps.get("add", []):
        opts += ["--cap-add", cap]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        memory = str(limits["memory"])
        assert memory.endswith("Mi"), memory
        opts += ["--memory", f"{memory[:-2]}m"]
    for mount in container.get("volumeMounts", []):
        mode = "ro" if mount.get("readOnly") else "rw"
        opts += ["--volume", f"{node.volumes[mount['name']]}:{mount['mountPath']}:{mode}"]
    if node.service_account is not None:
        opts += ["--volume", f"{node.service_account}:{SERVICE_ACCOUNT}:ro"]
    for var in container.get("env", []):
        name = var["name"]
        if name in node.env:
            value = node.env[name]
        elif "value" in var:
            value = var["value"]
        elif var.get("valueFrom") == {"fieldRef": {"fieldPath": "spec.nodeName"}}:
            value = node.name
        else:
            raise AssertionError(f"env {name}: a source the tests cannot provide: {var}")
        opts += ["--env", f"{name}={value}"]
    # Kubernetes: `command` replaces the image's entrypoint, `args` its CMD
    command = list(container.get("command", []))
    if command:
        opts += ["--entrypoint", command[0]]
    return [*opts, image, *command[1:], *container.get("args", [])]


# --- running a container ----------------------------------------------------------------------


class Container:
    """`podman run` in the foreground: lb's JSON log lines on its standard error are read
    as LbProcess reads them; `stop` is the kubelet's (the image's STOPSIGNAL, then the
    grace period)."""

    def __init__(self, name: str, lb: LbProcess) -> None:
        self.name = name
        self.lb = lb

    @classmethod
    async def start(cls, name: str, options: Sequence[str]) -> Container:
        podman("rm", "--force", name)
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPT),
            "podman",
            "run",
            "--rm",
            "--name",
            name,
            *options,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(name, LbProcess(proc, Path(os.devnull)))

    async def stop(self, grace: int) -> tuple[int, float]:
        """`podman stop --time GRACE`: the exit code and how long the container took."""
        start = time.monotonic()
        stop = await asyncio.create_subprocess_exec(
            str(SCRIPT),
            "podman",
            "stop",
            "--time",
            str(grace),
            self.name,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.wait_for(stop.wait(), grace + 30)
        code = await self.lb.wait(timeout=30)
        return code, time.monotonic() - start

    async def remove(self) -> None:
        await asyncio.to_thread(podman, "rm", "--force", "--time", "0", self.name)
        await self.lb.stop()


@contextlib.asynccontextmanager
async def running(name: str, options: Sequence[str]) -> AsyncIterator[Container]:
    container = await Container.start(name, options)
    try:
        yield container
    finally:
        await container.remove()
