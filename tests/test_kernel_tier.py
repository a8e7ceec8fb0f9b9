"""Boot Debian's kernel (which has IPVS) in a virtme-ng guest and run tests/kernel/ there.

One boot for the whole tier, under software emulation (docs/testing.md: KVM guests hang on
these machines). `scripts/setup`, run as root, provisions the kernel image, its modules,
qemu and virtme-ng. Without them this skips on a laptop, and fails when CI=true.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from bench import vm
from tests.support.root import CI, require_root

TIMEOUT = 40 * 60


def test_kernel_tier(tmp_path: Path) -> None:
    require_root()
    if lacking := vm.missing():
        message = "the kernel tier needs " + ", ".join(lacking) + ": run scripts/setup as root"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    results = tmp_path / "results"
    results.mkdir()
    extra = os.environ.get("LB_KERNEL_PYTEST_ARGS", "")  # e.g. "-k parity" while developing
    inner = (
        "LB_KERNEL_TIER=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 "
        # a test stuck past its timeout: every thread's stack in the log, and the run ends
        f"{sys.executable} -m pytest tests/kernel -p no:cacheprovider -ra -v "
        f"--timeout=420 --timeout-method=thread {extra} "
        f"--junitxml={results}/junit.xml > {results}/log.txt 2>&1; echo $? > {results}/rc"
    )
    code, stdout, stderr = vm.boot(inner, results, TIMEOUT)
    log = (results / "log.txt").read_text() if (results / "log.txt").exists() else ""
    rc = (results / "rc").read_text().strip() if (results / "rc").exists() else None
    if rc is None:
        pytest.fail(
            f"the guest did not run the tier (vng exit {code}):\n{stdout[-4000:]}\n{stderr[-4000:]}"
        )
    summary = re.findall(r"^(?:PASSED|FAILED|ERROR|SKIPPED).*$|^=+ .* =+$", log, re.M)
    print("\n".join(summary))
    assert rc == "0", f"kernel tier failed (pytest exit {rc}):\n{log[-12000:]}"
    assert "passed" in log and "skipped" not in log.splitlines()[-1], log[-2000:]
