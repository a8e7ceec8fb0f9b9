"""Each fuzz target (tests/fuzz/fuzz_<target>.py, with its dictionary <target>.dict if
there is one) runs for a bounded time from the corpus kept in tests/fuzz/corpus/<target>/
(read, never written: what a run finds goes to a scratch directory), and fails on the
first crash, with the input that caused it.

The targets share about a minute (BUDGET); `LB_FUZZ_SECONDS` gives each as many seconds
as it says instead. To grow the kept corpus, run a target by hand with the corpus
directory first, then minimise it:

    python -m tests.fuzz.fuzz_config tests/fuzz/corpus/config -dict=tests/fuzz/config.dict -max_total_time=600
    python -m tests.fuzz.fuzz_config -merge=1 MIN_DIR tests/fuzz/corpus/config
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.tier import figure

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py"))
#: seconds of fuzzing in a run, shared by the targets
BUDGET = 50
SECONDS = int(os.environ.get("LB_FUZZ_SECONDS", "0")) or max(10, BUDGET // len(TARGETS))


@pytest.mark.parametrize("target", TARGETS)
def test_the_fuzzer_finds_no_crash(target: str, tmp_path: Path) -> None:
    found = tmp_path / "found"
    found.mkdir()
    words = HERE / f"{target}.dict"
    args = [
        sys.executable,
        "-m",
        f"tests.fuzz.fuzz_{target}",
        str(found),
        str(HERE / "corpus" / target),
        *([f"-dict={words}"] if words.exists() else []),
        f"-max_total_time={SECONDS}",
        "-timeout=30",  # a single input taking longer is a finding too
        "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
        "-print_final_stats=1",
    ]
    proc = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 120, check=False
    )
    log = proc.stdout + proc.stderr
    artifacts = sorted(p for p in tmp_path.iterdir() if p.is_file())
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", log))
    cov = re.findall(r"DONE\s+cov: (\d+) ft: (\d+)", log)
    figure(
        f"fuzzing {target}: {int(stats.get('number_of_executed_units', 0)):,} inputs in "
        f"{SECONDS}s, coverage {cov[-1][0] if cov else '?'} edges, {len(artifacts)} crashes"
    )
    shown = "\n".join(f"{a.name}: {a.read_bytes()[:500]!r}" for a in artifacts)
    assert proc.returncode == 0 and not artifacts, f"{shown}\n{log[-6000:]}"
    assert int(stats.get("number_of_executed_units", 0)) > 100, log[-3000:]
