"""results.json -> results.md and PNG plots."""

from __future__ import annotations

from collections.abc import Callable
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
    for step, (title, scale_by) in SCALE_ROWS.items():

        def cell(s: dict[str, Any], k: float = scale_by) -> str:
            if s["runs"] == 1:
                return _figure(s["median"] * k)
            return f"{_figure(s['median'] * k)} ({_figure(s['low'] * k)}-{_figure(s['high'] * k)})"

        lines += ["", f"### {title}", ""]
        lines += size_table(sizes, {f"lb {n}": per for n, per in scale.items()}, step, cell)
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
