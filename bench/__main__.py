"""`python -m bench`: run the benchmarks, write bench/results/<date>/ (results.json,
Markdown tables, PNG plots). Needs root (network namespaces) and the README's set-up.

Four parts: the control plane (bench/control.py: applying services at 1..10,000;
bench/scale.py: `lb run` itself at those sizes, its edits, memory and idle CPU), the data
plane (bench/dataplane.py: connections, requests, bulk and UDP through lb and its peers, in
network namespaces), `k8s` (bench/k8s.py: `lb run --source kubernetes` against the API
server double at those sizes, and its network programming latency under EndpointSlice
churn), and the kernel VM (bench/vm.py), where lb's IPVS dataplane can run: the data plane
again, and the `ipvs-control` part (lb ipvs beside lb nftables applying services); its
figures are compared only with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench import control, dataplane, k8s, scale, vm
from bench.peers import ALL_PEERS, PEERS
from bench.report import write_report
from bench.topology import bench_lock, remove_bench_namespaces
from bench.workloads import WORKLOADS

FULL_SIZES = [1, 10, 100, 1000, 10_000]
QUICK_SIZES = [1, 10, 100]
PARTS = ("control", "dataplane", "k8s", "vm", "ipvs-control")
DEFAULT_PARTS = ("control", "dataplane", "k8s", "vm")
QUICK_PARTS = ("control", "dataplane")


def names(
    arg: str | None, flag: str, known: tuple[str, ...], default: tuple[str, ...] | None = None
) -> list[str]:
    """A comma-separated choice among `known` (`default`, else all of them, when not
    given), in the given order; a name that is not known raises ValueError with the
    message to print."""
    if arg is None:
        return list(default if default is not None else known)
    chosen = [x.strip() for x in arg.split(",") if x.strip()]
    bad = [x for x in chosen if x not in known]
    if bad or not chosen:
        raise ValueError(
            f"bench: {flag}: unknown {', '.join(repr(b) for b in bad) or 'empty list'}"
            f" (choose among: {', '.join(known)})"
        )
    return list(dict.fromkeys(chosen))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, 1 s tool runs, 3 runs: checks the bench works in a few minutes",
    )
    p.add_argument("--runs", type=int, help="runs per figure (default 5; --quick: 3)")
    p.add_argument("--sizes", help="comma-separated service counts (default 1,10,100,1000,10000)")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<date>)")
    p.add_argument(
        "--only",
        help="comma-separated parts: control, dataplane, k8s, vm, ipvs-control (default: "
        "control, dataplane, k8s and vm, which runs the data plane and ipvs-control in the "
        "kernel VM; --quick: control and dataplane; ipvs-control alone needs a kernel with "
        "IPVS)",
    )
    p.add_argument(
        "--peers",
        help=f"data plane: comma-separated peers among {', '.join(ALL_PEERS)} (default "
        "all but lb ipvs, which needs a kernel with IPVS: the vm part runs it); with the vm "
        "part, its data plane runs these peers, and it leaves ipvs-control out",
    )
    p.add_argument(
        "--workloads",
        help=f"data plane: comma-separated workloads (default all: {', '.join(WORKLOADS)})",
    )
    args = p.parse_args(argv)
    try:
        parts = names(args.only, "--only", PARTS, QUICK_PARTS if args.quick else DEFAULT_PARTS)
        peers = names(args.peers, "--peers", ALL_PEERS, PEERS)
        workloads = names(args.workloads, "--workloads", tuple(WORKLOADS))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
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
    if "dataplane" in parts and (missing := dataplane.missing_tools()):
        print(
            f"bench: the data plane needs {', '.join(missing)} (./scripts/setup installs them)",
            file=sys.stderr,
        )
        return 2
    if "dataplane" in parts and "lb ipvs" in peers and not vm.ipvs_available():
        print(
            "bench: --peers: lb ipvs needs a kernel with IPVS, which this one is not "
            "(the vm part measures it in the kernel VM: --only vm)",
            file=sys.stderr,
        )
        return 2
    if "ipvs-control" in parts and not vm.ipvs_available():
        print(
            "bench: --only ipvs-control needs a kernel with IPVS, which this one is not "
            "(the vm part runs it in the kernel VM)",
            file=sys.stderr,
        )
        return 2
    if "vm" in parts and (lacking := vm.missing()):
        print(
            f"bench: the vm part needs {', '.join(lacking)} (./scripts/setup installs them;"
            " --only control,dataplane leaves it out)",
            file=sys.stderr,
        )
        return 2
    today = datetime.date.today().isoformat()
    out: Path = args.out or Path(__file__).parent / "results" / (
        today + ("-quick" if args.quick else "")
    )
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, object] = {"date": today, "quick": args.quick, "machine": machine()}

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # as Ctrl-C: the namespaces and processes are removed

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it

    def save() -> None:
        """After each part: a later part that fails or is interrupted loses nothing."""
        (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
        write_report(out, doc)

    try:
        with bench_lock():
            try:
                failed = run_parts(
                    doc,
                    save,
                    parts=parts,
                    sizes=sizes,
                    runs=runs,
                    peers=peers,
                    workloads=workloads,
                    quick=args.quick,
                    vm_peers=peers if args.peers else None,
                )
            except KeyboardInterrupt:
                remove_bench_namespaces()  # a second safety net: each part removes its own
                raise
    except KeyboardInterrupt:
        print(
            "bench: interrupted; its namespaces and processes are removed; the parts done"
            f" are in {out}",
            file=sys.stderr,
        )
        return 130
    if failed:
        doc["failed"] = failed
    save()
    print(f"bench: results in {out}")
    for part, why in failed.items():
        print(f"bench: the {part} part failed: {why}", file=sys.stderr)
    return 1 if failed else 0


def run_parts(
    doc: dict[str, object],
    save: Callable[[], None],
    *,
    parts: list[str],
    sizes: list[int],
    runs: int,
    peers: list[str],
    workloads: list[str],
    quick: bool,
    vm_peers: list[str] | None = None,
) -> dict[str, str]:
    """Run the parts, saving after each; the parts that failed, with the reason (the
    vm part's guest may fail on its own: the host's parts stand)."""
    from rich.progress import Progress

    failed: dict[str, str] = {}

    with Progress() as progress:
        if "control" in parts:
            task = progress.add_task("control plane", total=len(sizes) * len(control.APPLIERS))

            def advance(what: str) -> None:
                progress.update(task, advance=1, description=f"control plane: {what}")

            results = asyncio.run(control.measure(sizes, runs, advance))
            doc["control"] = as_json(results)
            stask = progress.add_task("lb run", total=len(sizes) * len(scale.DATAPLANES))

            def sadvance(what: str) -> None:
                progress.update(stask, advance=1, description=f"lb run: {what}")

            doc["scale"] = as_json(asyncio.run(scale.measure(sizes, runs, sadvance, quick)))
            save()
        if "dataplane" in parts:
            dtask = progress.add_task("data plane", total=runs * len(peers))

            def dadvance(what: str) -> None:
                progress.update(dtask, advance=1, description=f"data plane: {what}")

            doc["dataplane"] = asyncio.run(
                dataplane.measure(peers, workloads, runs, quick, dadvance)
            )
            save()
        if "k8s" in parts:
            ktask = progress.add_task(
                "lb run --source kubernetes", total=len(sizes) * (1 + len(k8s.DATAPLANES))
            )

            def kadvance(what: str) -> None:
                progress.update(ktask, advance=1, description=f"k8s: {what}")

            doc["k8s"] = asyncio.run(k8s.measure(sizes, runs, kadvance, quick))
            save()
        if "ipvs-control" in parts:
            itask = progress.add_task(
                "ipvs control plane", total=len(sizes) * len(control.IPVS_APPLIERS)
            )

            def iadvance(what: str) -> None:
                progress.update(itask, advance=1, description=f"ipvs control plane: {what}")

            doc["ipvs_control"] = as_json(
                asyncio.run(control.measure(sizes, runs, iadvance, control.IPVS_APPLIERS))
            )
            save()
        if "vm" in parts:
            vtask = progress.add_task("the kernel VM (booted, running)", total=1)
            try:
                doc["vm"] = vm.run(runs, quick, workloads, vm_peers)
            except RuntimeError as e:
                failed["vm"] = str(e)
            else:
                save()
            progress.update(vtask, advance=1)
    return failed


def as_json(results: control.Results) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    return {
        name: {str(n): {step: s.as_dict() for step, s in by.items()} for n, by in per.items()}
        for name, per in results.items()
    }


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
