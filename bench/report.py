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
    for step, title in STEP_TITLES.items():
        lines += ["", f"### {title}", ""]
        lines.append("| dataplane | " + " | ".join(f"{n:,}" for n in sizes) + " |")
        lines.append("|---|" + "---:|" * len(sizes))
        for name, per in control.items():
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
        for name, per in control.items():
            sizes = sorted(int(n) for n in per)
            med = [per[str(n)][step]["median"] * 1000 for n in sizes]
            low = [per[str(n)][step]["low"] * 1000 for n in sizes]
            high = [per[str(n)][step]["high"] * 1000 for n in sizes]
            ax.plot(sizes, med, marker="o", label=name)
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
