"""Boot Debian's kernel (which has IPVS) in a virtme-ng guest and run tests/kernel/ there.

One boot for the whole tier, under software emulation (kernel-vm.md: KVM guests hang on
these machines). `scripts/setup`, run as root, provisions the kernel image, its modules,
qemu and virtme-ng. Without them this skips on a laptop, and fails when CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CI, require_root

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 40 * 60


def kernel_image() -> Path | None:
    """A /boot/vmlinuz whose modules include IPVS (Debian's linux-image-*-amd64)."""
    wanted = os.environ.get("LB_KERNEL_IMAGE")
    if wanted:
        return Path(wanted)
    for image in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        version = image.name.removeprefix("vmlinuz-")
        if list(Path(f"/lib/modules/{version}").rglob("ip_vs.ko*")):
            return image
    return None


def test_kernel_tier(tmp_path: Path) -> None:
    require_root()
    image = kernel_image()
    venv_bin = Path(sys.executable).parent
    vng = shutil.which("vng") or (str(venv_bin / "vng") if (venv_bin / "vng").exists() else None)
    missing = [
        what
        for what, ok in (
            ("a kernel with IPVS in /boot (Debian's linux-image-amd64)", image is not None),
            ("virtme-ng (vng)", vng is not None),
            ("qemu-system-x86_64", shutil.which("qemu-system-x86_64") is not None),
            ("udev", Path("/lib/udev").exists() or shutil.which("udevadm") is not None),
        )
        if not ok
    ]
    if missing:
        message = "the kernel tier needs " + ", ".join(missing) + ": run scripts/setup as root"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    assert image is not None and vng is not None
    results = tmp_path / "results"
    results.mkdir()
    extra = os.environ.get("LB_KERNEL_PYTEST_ARGS", "")  # e.g. "-k parity" while developing
    inner = (
        f"cd {ROOT} && LB_KERNEL_TIER=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 "
        # a test stuck past its timeout: every thread's stack in the log, and the run ends
        f"{sys.executable} -m pytest tests/kernel -p no:cacheprovider -ra -v "
        f"--timeout=420 --timeout-method=thread {extra} "
        f"--junitxml={results}/junit.xml > {results}/log.txt 2>&1; echo $? > {results}/rc"
    )
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
    # The guest reads the host's files over 9p, slowly, and cannot write bytecode: compile
    # it here once (the environment may say PYTHONDONTWRITEBYTECODE).
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "lb", "offload", "tests"], cwd=ROOT, check=True
    )
    proc = subprocess.Popen(
        [vng, "--run", str(image), "--disable-kvm", "--memory", "2G", "--cpus", "2",
         "--rwdir", str(results), "--exec", inner],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a timeout takes qemu down too
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    except BaseException:  # this run interrupted: never leave qemu behind
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    log = (results / "log.txt").read_text() if (results / "log.txt").exists() else ""
    rc = (results / "rc").read_text().strip() if (results / "rc").exists() else None
    if rc is None:
        pytest.fail(
            f"the guest did not run the tier (vng exit {proc.returncode}):\n{stdout[-4000:]}\n{stderr[-4000:]}"
        )
    summary = re.findall(r"^(?:PASSED|FAILED|ERROR|SKIPPED).*$|^=+ .* =+$", log, re.M)
    print("\n".join(summary))
    assert rc == "0", f"kernel tier failed (pytest exit {rc}):\n{log[-12000:]}"
    assert "passed" in log and "skipped" not in log.splitlines()[-1], log[-2000:]
