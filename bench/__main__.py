"""`python -m bench`: run the benchmarks, write bench/results/<date>/ (results.json, a
Markdown table, PNG plots). Needs root (network namespaces) and the README's set-up.

Today it measures the control plane (bench/control.py); the data-plane workloads of
issue 7 (connection rate, request/response, throughput, UDP) are not written yet.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from bench import control
from bench.report import write_report

FULL_SIZES = [1, 10, 100, 1000, 10_000]
QUICK_SIZES = [1, 10, 100]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--quick", action="store_true", help="small sizes, 3 runs: checks the bench works"
    )
    p.add_argument("--runs", type=int, help="runs per figure (default 5; --quick: 3)")
    p.add_argument("--sizes", help="comma-separated service counts (default 1,10,100,1000,10000)")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<date>)")
    args = p.parse_args(argv)
    try:
        sizes = (
            [int(x) for x in args.sizes.split(",")]
            if args.sizes
            else (QUICK_SIZES if args.quick else FULL_SIZES)
        )
    except ValueError:
        print(
            f"bench: --sizes must be integers separated by commas, not {args.sizes!r}",
            file=sys.stderr,
        )
        return 2
    if any(n < 1 for n in sizes):
        print("bench: every size in --sizes must be at least 1", file=sys.stderr)
        return 2
    runs = args.runs if args.runs is not None else (3 if args.quick else 5)
    if runs < 1:
        print("bench: --runs must be at least 1", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    today = datetime.date.today().isoformat()
    out: Path = args.out or Path(__file__).parent / "results" / (
        today + ("-quick" if args.quick else "")
    )
    out.mkdir(parents=True, exist_ok=True)

    from rich.progress import Progress

    with Progress() as progress:
        task = progress.add_task("control plane", total=len(sizes) * len(control.APPLIERS))

        def advance(what: str) -> None:
            progress.update(task, advance=1, description=f"control plane: {what}")

        results = asyncio.run(control.measure(sizes, runs, advance))
    doc = {
        "date": today,
        "quick": args.quick,
        "machine": machine(),
        "control": {
            name: {str(n): {step: s.as_dict() for step, s in by.items()} for n, by in per.items()}
            for name, per in results.items()
        },
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_report(out, doc)
    print(f"bench: results in {out}")
    return 0


def machine() -> dict[str, str | int | None]:
    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return "missing"

    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "nft": version(["nft", "--version"]),
        "iptables": version(["iptables-legacy", "--version"]),
    }


if __name__ == "__main__":
    sys.exit(main())
