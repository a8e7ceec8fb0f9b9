"""results.json -> results.md and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    "kernel committing it. The rest of each change above is lb comparing the desired list "
    "of N services with the one it applied last (in Python, about 0.2 us per service)."
)


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"# lb bench, {doc['date']}" + (" (--quick)" if doc["quick"] else ""),
        "",
        f"Machine: {m['cpus']} CPUs, kernel {m['kernel']}, Python {m['python']}, "
        f"{m['nft']}, {m['iptables']}.",
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
        lines.append("| dataplane | " + " | ".join(f"{n:,}" for n in sizes) + " |")
        lines.append("|---|" + "---:|" * len(sizes))
        for name, per in rows.items():
            cells = []
            for n in sizes:
                s = per.get(str(n), {}).get(step)
                cells.append(
                    "" if s is None else f"{ms(s['median'])} ({ms(s['low'])}-{ms(s['high'])})"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(out: Path, doc: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
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
    paths.append(path)
    return paths


def write_report(out: Path, doc: dict[str, Any]) -> None:
    (out / "results.md").write_text(markdown(doc))
    plot(out, doc)
