"""results.json -> results.md and PNG plots."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.report_dataplane import dataplane_markdown, dataplane_plot
from bench.stats import ms

STEP_TITLES = {
    "full": "apply all N services",
    "add_one": "add one service to N",
    "edit_one": "drain one backend of one service",
}
#: Shown after the steps, for the dataplanes that separate them (see bench/control.py)
KERNEL_TITLES = {
    "add_one_kernel": "add one service to N: the kernel transaction alone",
    "edit_one_kernel": "drain one backend: the kernel transaction alone",
}
KERNEL_NOTE = (
    "The same changes, timing only lb's netlink transaction: encoding the batch and the "
    "kernel committing it. The rest of each change above is lb rendering the changed "
    "service's objects and working out their difference (the dataplane is told which "
    "service changed, as lb's offload manager tells it)."
)
#: bench/scale.py: `lb run` itself at each size
SCALE_ROWS = {
    "edit": ("one weight edit through the admin API, answered once applied (ms)", 1000.0),
    "start": ("from `lb run` to ready (s)", 1.0),
    "rss_mb": ("memory once started, RSS (MB)", 1.0),
    "idle_cpu_percent": ("CPU with nothing happening (% of a core)", 1.0),
}
#: bench/k8s.py: the API double alone (ms, but the load and the size)
K8S_DOUBLE_ROWS = {
    "load": ("load the Services, EndpointSlices and node (s)", 1.0),
    "list_services": ("list every Service, raw pages (ms)", 1000.0),
    "list_endpoint_slices": ("list every EndpointSlice, raw pages (ms)", 1000.0),
    "list_services_decoded": ("list every Service through lb's client (ms)", 1000.0),
    "list_endpoint_slices_decoded": ("list every EndpointSlice through lb's client (ms)", 1000.0),
    "endpoint_slices_mb": ("the EndpointSlices' JSON (MB)", 1.0),
}
#: bench/k8s.py: lb run --source kubernetes
K8S_LB_ROWS = {
    "start": ("from `lb run` to ready: listed and the first sync applied (s)", 1.0),
    "up": ("from `lb run` to lb.started: the API connected, the informers started (s)", 1.0),
    "listed": ("from `lb run` to k8s.synced: Services, EndpointSlices and node listed (s)", 1.0),
    "programmed": ("from `lb run` to k8s.first_sync: the first sync applied (s)", 1.0),
    "failed_syncs": (
        "syncs that failed before ready (k8s.sync_failed: retried min_sync_period later, doubling)",
        1.0,
    ),
    "rss_mb": SCALE_ROWS["rss_mb"],
    "idle_cpu_percent": SCALE_ROWS["idle_cpu_percent"],
}


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"# lb bench, {doc['date']}" + (" (--quick)" if doc["quick"] else ""),
        "",
        f"Machine: {m['cpus']} CPUs, kernel {m['kernel']}, Python {m['python']}, "
        f"{m['nft']}, {m['iptables']}.",
    ]
    if "control" in doc:
        lines += control_markdown(doc)
    if "scale" in doc:
        lines += scale_markdown(doc["scale"])
    if "dataplane" in doc:
        lines += dataplane_markdown(doc["dataplane"])
    if "k8s" in doc:
        lines += k8s_markdown(doc["k8s"])
    if "ipvs_control" in doc:
        lines += ipvs_control_markdown(doc["ipvs_control"], "On this machine's kernel.")
    if "vm" in doc:
        vm = doc["vm"]
        emulated = (
            f"In a guest of Debian's kernel {vm['kernel']} (it has IPVS and flowtables, this "
            "machine's kernel does not) under qemu's software emulation (bench/vm.py): "
            "every figure is far below the host's, so compare them only with each other "
            "(the ratios below), never with the tables above."
        )
        if vm.get("dataplane"):
            lines += dataplane_markdown(
                vm["dataplane"],
                heading="Data plane in the kernel VM, with lb ipvs and lb nftables's flowtable",
                note=emulated,
            )
        if vm.get("ipvs_control"):
            lines += ipvs_control_markdown(vm["ipvs_control"], emulated)
    for part, why in doc.get("failed", {}).items():
        lines += ["", f"## The {part} part failed", "", "```", why.strip(), "```"]
    return "\n".join(lines) + "\n"


def control_markdown(doc: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Control plane: services x 10 backends",
        "",
        "Median time in ms (smallest-largest of the runs), each dataplane in its own "
        "network namespace, measured in turns in one run of `python -m bench`. "
        "iptables-restore rewrites the whole nat table on every change, as kube-proxy's "
        "iptables mode does. An empty cell: not measured at that size (see bench/control.py).",
    ]
    control = doc["control"]
    sizes = sorted({int(n) for per in control.values() for n in per})
    for step, title in (STEP_TITLES | KERNEL_TITLES).items():
        rows = {
            name: per for name, per in control.items() if any(step in by for by in per.values())
        }
        if not rows:
            continue
        lines += ["", f"### {title}", ""]
        if step in KERNEL_TITLES:
            lines += [KERNEL_NOTE, ""]
        lines += size_table(
            sizes,
            rows,
            step,
            lambda s: f"{ms(s['median'])} ({ms(s['low'])}-{ms(s['high'])})",
        )
    return lines


def ipvs_control_markdown(control: dict[str, Any], note: str) -> list[str]:
    """lb ipvs beside lb nftables (bench/control.py IPVS_APPLIERS): each step's times, and
    one change at each size relative to the smallest (flat: the work of the change)."""
    sizes = sorted({int(n) for per in control.values() for n in per})
    lines = [
        "",
        "## Control plane with IPVS: services x 10 backends",
        "",
        note + " Median time in ms (smallest-largest of the runs); each change is told "
        "which service changed, as lb's offload manager tells it.",
    ]
    for step, title in STEP_TITLES.items():
        lines += ["", f"### {title}", ""]
        lines += size_table(
            sizes,
            control,
            step,
            lambda s: f"{ms(s['median'])} ({ms(s['low'])}-{ms(s['high'])})",
        )
    smallest = str(sizes[0]) if sizes else ""
    for step in ("add_one", "edit_one"):
        lines += [
            "",
            f"### {STEP_TITLES[step]}: relative to {sizes[0] if sizes else 0:,} services",
            "",
        ]
        rows = {}
        for name, per in control.items():
            base = per.get(smallest, {}).get(step)
            if base is None or not base["median"]:
                continue
            rows[name] = {
                n: {step: {"ratio": by[step]["median"] / base["median"]}}
                for n, by in per.items()
                if step in by
            }
        lines += size_table(sizes, rows, step, lambda s: f"{s['ratio']:.2f}x")
    return lines


def size_table(
    sizes: list[int],
    rows: dict[str, dict[str, dict[str, Any]]],
    step: str,
    cell: Callable[[dict[str, Any]], str],
) -> list[str]:
    """A Markdown table: a row per dataplane, a column per size, `cell` of each summary
    of `step` (an empty cell where it was not measured)."""
    lines = ["| dataplane | " + " | ".join(f"{n:,}" for n in sizes) + " |"]
    lines.append("|---|" + "---:|" * len(sizes))
    for name, per in rows.items():
        cells = []
        for n in sizes:
            s = per.get(str(n), {}).get(step)
            cells.append("" if s is None else cell(s))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _figure(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def scale_markdown(scale: dict[str, Any]) -> list[str]:
    sizes = sorted({int(n) for per in scale.values() for n in per})
    lines = [
        "",
        "## lb run at N services x 10 backends, end to end",
        "",
        "The real `lb run -c FILE --dataplane D` in a namespace of its own (bench/scale.py): "
        "an edit is a `POST` to the admin API, timed by a client in the namespace, from the "
        "request to the answer, which lb sends once every dataplane has applied it "
        "(median of the runs, smallest-largest); start, memory and idle CPU are one "
        "measurement each.",
    ]
    return lines + figure_tables(sizes, {f"lb {n}": per for n, per in scale.items()}, SCALE_ROWS)


def figure_tables(
    sizes: list[int],
    rows: dict[str, dict[str, dict[str, Any]]],
    titles: dict[str, tuple[str, float]],
) -> list[str]:
    """A table per figure of `titles` (its heading, and what its values are multiplied
    by): a row per entry of `rows`, a column per size, the median (smallest-largest)."""
    lines: list[str] = []
    for step, (title, scale_by) in titles.items():
        lines += ["", f"### {title}", ""]
        lines += size_table(sizes, rows, step, partial(_summary, k=scale_by))
    return lines


def _summary(s: dict[str, Any], k: float) -> str:
    """A summary times k: the median, and its spread if there was more than one run."""
    if s["runs"] == 1:
        return _figure(s["median"] * k)
    return f"{_figure(s['median'] * k)} ({_figure(s['low'] * k)}-{_figure(s['high'] * k)})"


def k8s_markdown(k8s: dict[str, Any]) -> list[str]:
    """bench/k8s.py: the API double alone, lb's starts against it, and the churn."""
    sizes = sorted(int(n) for n in k8s["double"])
    lines = [
        "",
        "## The Kubernetes API server double alone: N Services and N EndpointSlices",
        "",
        "tests/support/kube_double.py in the bench's process, each Service with one "
        "EndpointSlice of 10 endpoints; one client lists everything in pages of 500 (lb's "
        "informer's size): raw pages (aiohttp, bytes: the double's work and the transfer), "
        "and through lb's client (kubernetes-asyncio and JSON decoding, as lb's informer). "
        "Median of the runs (smallest-largest).",
    ]
    lines += ["", "| figure | " + " | ".join(f"{n:,}" for n in sizes) + " |"]
    lines.append("|---|" + "---:|" * len(sizes))
    for name, (title, k) in K8S_DOUBLE_ROWS.items():
        cells = [_summary(k8s["double"][str(n)][name], k) for n in sizes]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## lb run --source kubernetes at N Services x 10 endpoints",
        "",
        "The real `lb run --source kubernetes --dataplane D` in a namespace of its own, the "
        "double on that namespace's loopback (bench/k8s.py): starts to /readyz answering 200, "
        "median of the runs (smallest-largest), with the phases from lb's log; memory and "
        "idle CPU after the last start.",
    ]
    lines += figure_tables(sizes, {f"lb {dp}": per for dp, per in k8s["lb"].items()}, K8S_LB_ROWS)
    for dp, per in k8s.get("failures", {}).items():
        for n, messages in per.items():
            lines += ["", f"Syncs that failed, lb {dp} at {int(n):,} services:", ""]
            lines += [f"- {m}" for m in messages]
    return lines + k8s_churn_markdown(k8s["churn"])


def k8s_churn_markdown(churn: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## Network programming latency under EndpointSlice churn, {churn['services']:,} Services",
        "",
        f"EndpointSlice updates at a steady rate for {churn['seconds']:g} s, each with "
        "`endpoints.kubernetes.io/last-change-trigger-time` set at the change; lb's "
        "`lb_kubernetes_network_programming_duration_seconds` from /metrics before and after "
        "(p50 and p99 interpolated within its buckets, as histogram_quantile; the bucket in "
        "brackets; the mean is exact), the syncs it took, lb's CPU while the updates "
        "came (its own and its children's, % of a core), and from the last update to the "
        "admin API showing it (caught up). Times in ms.",
        "",
        "| dataplane, rate | updates | applied | p50 | p99 | mean | syncs | mean sync | lb CPU "
        "| caught up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def bucket(c: dict[str, float], q: str) -> str:
        if q not in c:
            return ""
        low, high = ms(c[f"{q}_bucket_low"]), c[f"{q}_bucket_high"]
        top = "+Inf" if high == float("inf") else ms(high)
        return f"{ms(c[q])} ({low}-{top}]"

    for dp, rates in churn["rates"].items():
        for rate, c in rates.items():
            mean, sync, caught = (
                ms(c[k]) if k in c else "" for k in ("mean", "sync_mean", "caught_up")
            )
            lines.append(
                f"| lb {dp}, {rate}/s | {c['updates']:,.0f} | {c['applied']:,.0f} | "
                f"{bucket(c, 'p50')} | {bucket(c, 'p99')} | {mean} | {c['syncs']:,.0f} | "
                f"{sync} | {c['cpu_percent']:.3g} | {caught or 'not in time'} |"
            )
    return lines


def scale_plot(out: Path, scale: dict[str, Any]) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, step in zip(axes, ("edit", "rss_mb"), strict=True):
        title, scale_by = SCALE_ROWS[step]
        for name, per in scale.items():
            sizes = sorted(int(n) for n in per)
            med = [per[str(n)][step]["median"] * scale_by for n in sizes]
            low = [per[str(n)][step]["low"] * scale_by for n in sizes]
            high = [per[str(n)][step]["high"] * scale_by for n in sizes]
            ax.plot(sizes, med, marker="o", label=f"lb {name}")
            ax.fill_between(sizes, low, high, alpha=0.2)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("services (x 10 backends)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = out / "scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def control_plot(out: Path, doc: dict[str, Any]) -> Path:
    import matplotlib.pyplot as plt

    control = doc["control"]
    fig, axes = plt.subplots(1, len(STEP_TITLES), figsize=(15, 4.5), sharey=True)
    for ax, (step, title) in zip(axes, STEP_TITLES.items(), strict=True):
        lines = [(name, per, step, "-") for name, per in control.items()]
        kernel = f"{step}_kernel"
        lines += [
            (f"{name}: kernel transaction", per, kernel, "--")
            for name, per in control.items()
            if any(kernel in by for by in per.values())
        ]
        for label, per, key, style in lines:
            sizes = sorted(int(n) for n in per)
            med = [per[str(n)][key]["median"] * 1000 for n in sizes]
            low = [per[str(n)][key]["low"] * 1000 for n in sizes]
            high = [per[str(n)][key]["high"] * 1000 for n in sizes]
            ax.plot(sizes, med, style, marker="o", label=label)
            ax.fill_between(sizes, low, high, alpha=0.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("services (x 10 backends)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms (median, band: smallest-largest)")
    axes[0].legend()
    fig.tight_layout()
    path = out / "control.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(out: Path, doc: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    paths = []
    if "control" in doc:
        paths.append(control_plot(out, doc))
    if "scale" in doc:
        paths.append(scale_plot(out, doc["scale"]))
    if "dataplane" in doc:
        paths.append(dataplane_plot(out, doc["dataplane"]))
    if doc.get("vm", {}).get("dataplane"):
        paths.append(dataplane_plot(out, doc["vm"]["dataplane"], "dataplane-vm", "in the VM"))
    return paths


def write_report(out: Path, doc: dict[str, Any]) -> None:
    (out / "results.md").write_text(markdown(doc))
    plot(out, doc)
