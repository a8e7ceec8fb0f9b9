"""A file with a problem on every line is reported at once and in little memory: the
loader stops reading at its 1,000th problem (lb.config.MAX_COLLECTED_PROBLEMS) and lists
the first 100. Before, a 20 MB file with 436,906 problems took 62 s and 1.9 GB. Figure:
seconds and peak memory of `lb check` on such a file."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from lb.config import MAX_COLLECTED_PROBLEMS, MAX_LISTED_PROBLEMS, parse_config
from tests.reliability.tier import figure, problem_file, scaled

MEASURE = """\
import resource, sys, time
from lb.cli import main
began = time.monotonic()
code = main(["check", "-c", sys.argv[1]])
seconds = time.monotonic() - began
print(code, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


async def test_a_20_mb_file_with_400_000_problems_is_reported_quickly_in_bounded_memory(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bad.yaml"
    problem_file(path, scaled(436_906))
    size = path.stat().st_size
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        MEASURE,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    code, seconds, peak = out.decode().split()
    lines = err.decode().splitlines()
    figure(
        f"a {size / 1e6:.0f} MB file with a problem on each of its {scaled(436_906):,} services: "
        f"`lb check` exits {code} in {float(seconds):.2f}s, peak RSS {peak} MiB (bounds 10 s, "
        f"300 MiB; it took 62 s and 1.9 GB before)"
    )
    assert code == "2" and float(seconds) < 10 and int(peak) < 300
    assert len(lines) == MAX_LISTED_PROBLEMS + 2, lines[-3:]
    listed, more, total = lines[:-2], lines[-2], lines[-1]
    assert all("is already used by services[0]" in line for line in listed[1:])
    unlisted = MAX_COLLECTED_PROBLEMS - MAX_LISTED_PROBLEMS
    assert f"... and {unlisted} more problems (reading stopped at 1,000" in more
    assert total == f"{path}: at least {MAX_COLLECTED_PROBLEMS:,} problems"


def test_a_key_a_merge_brings_in_may_be_set_again() -> None:
    """Overriding a merged key is what merge keys are for, not a duplicate key (the
    loader used to look for duplicates after merging)."""
    text = """\
services:
- &web {name: web, listen: '127.0.0.1:8080', backends: [{address: '127.0.0.1:9001'}]}
- {<<: *web, name: api, listen: '127.0.0.1:8081'}
"""
    web, api = parse_config(text).services
    assert (api.name, str(api.listen), api.backends) == ("api", "127.0.0.1:8081", web.backends)
