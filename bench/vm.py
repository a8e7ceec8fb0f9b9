"""The kernel VM (docs/testing.md): Debian's kernel, which has IPVS, booted with virtme-ng
under qemu's software emulation (KVM guests hang on these machines). The guest sees the
host's files, so it runs this checkout and its venv as they are.

Used by the kernel test tier (tests/test_kernel_tier.py) and by the bench's vm part
(`python -m bench`, or `--only vm`), which runs the data plane in the guest to measure
`lb ipvs` next to the peers that run there too. The guest's CPU is emulated: its figures
are compared only with each other (ratios within one guest run), never with the host's.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def kernel_image() -> Path | None:
    """A /boot/vmlinuz whose modules include IPVS (Debian's linux-image-*-amd64);
    LB_KERNEL_IMAGE chooses one."""
    wanted = os.environ.get("LB_KERNEL_IMAGE")
    if wanted:
        return Path(wanted)
    for image in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        version = image.name.removeprefix("vmlinuz-")
        if list(Path(f"/lib/modules/{version}").rglob("ip_vs.ko*")):
            return image
    return None


def vng() -> str | None:
    venv_vng = Path(sys.executable).with_name("vng")
    return shutil.which("vng") or (str(venv_vng) if venv_vng.exists() else None)


def missing() -> list[str]:
    """What booting the guest needs and this machine lacks (scripts/setup provides it)."""
    return [
        what
        for what, ok in (
            ("a kernel with IPVS in /boot (Debian's linux-image-amd64)", kernel_image()),
            ("virtme-ng (vng)", vng()),
            ("qemu-system-x86_64", shutil.which("qemu-system-x86_64")),
            ("udev", Path("/lib/udev").exists() or shutil.which("udevadm")),
        )
        if not ok
    ]


def boot(inner: str, rwdir: Path, timeout: float) -> tuple[int | None, str, str]:
    """Run the shell command `inner` as root in a fresh guest (2 CPUs, 2 GiB) that may
    write to `rwdir`: (vng's exit code, None if it timed out; its stdout; its stderr)."""
    image, command = kernel_image(), vng()
    if image is None or command is None:
        raise RuntimeError("the kernel VM needs " + ", ".join(missing()))
    # The guest reads the host's files over 9p, slowly, and cannot write bytecode: compile
    # it here once (the environment may say PYTHONDONTWRITEBYTECODE).
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "lb", "offload", "tests", "bench"],
        cwd=ROOT,
        check=True,
    )
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [command, "--run", str(image), "--disable-kvm", "--memory", "2G", "--cpus", "2",
         "--rwdir", str(rwdir), "--exec", f"cd {ROOT} && {inner}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a timeout takes qemu down too
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, stdout, stderr
    except BaseException:  # interrupted: never leave qemu behind
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, stdout, stderr


def ipvs_available() -> bool:
    """This kernel has IPVS (loaded, or loadable)."""
    if not Path("/proc/net/ip_vs").exists():
        subprocess.run(["modprobe", "-q", "ip_vs"], capture_output=True, check=False)
    return Path("/proc/net/ip_vs").exists()


#: Rounds in the guest at most: its emulated CPU makes a round take minutes
VM_RUNS = 3


#: The control plane's sizes in the guest: one change at each, relative to the smallest.
VM_SIZES = (10, 100, 1000, 10_000)
QUICK_VM_SIZES = (10, 100)


def run(
    runs: int, quick: bool, workloads: list[str], peers: list[str] | None = None
) -> dict[str, Any]:
    """The bench's data plane with VM_PEERS and its ipvs-control part (lb ipvs beside lb
    nftables, VM_SIZES), in one guest, `runs` rounds (VM_RUNS at most): {"kernel",
    "machine", "dataplane", "ipvs_control"} as the guest's results.json has them.
    `peers`: only the data plane, with these peers (a narrowed run)."""
    from bench.peers import VM_PEERS

    runs = min(runs, VM_RUNS)
    sizes = QUICK_VM_SIZES if quick else VM_SIZES
    parts = "dataplane" if peers else "dataplane,ipvs-control"
    with tempfile.TemporaryDirectory(prefix="lbbench-vm-") as tmp:
        rw = Path(tmp)
        bench = [
            sys.executable, "-m", "bench", "--only", parts,
            "--peers", ",".join(peers or VM_PEERS), "--workloads", ",".join(workloads),
            "--sizes", ",".join(map(str, sizes)), "--runs", str(runs), "--out", str(rw),
            *(["--quick"] if quick else []),
        ]  # fmt: skip
        inner = f"PYTHONDONTWRITEBYTECODE=1 {shlex.join(bench)} > {rw}/log.txt 2>&1"
        code, _, stderr = boot(inner, rw, timeout=(60 if quick else 300) * 60)
        results = rw / "results.json"
        if not results.exists():
            log = rw / "log.txt"
            said = log.read_text()[-3000:] if log.exists() else stderr[-3000:]
            raise RuntimeError(f"the bench in the kernel VM wrote no results (vng {code}):\n{said}")
        doc = json.loads(results.read_text())
    return {
        "kernel": doc["machine"]["kernel"],
        "machine": doc["machine"],
        "dataplane": doc.get("dataplane", {}),
        "ipvs_control": doc.get("ipvs_control", {}),
    }
