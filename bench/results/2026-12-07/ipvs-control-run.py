"""In the kernel VM's guest: lb's IPVS dataplane alone, one change at 10, 100 and 1,000
services (bench/control.py), the results written after each size to OUT/ipvs_control.json.

Run from the repository root in the guest (booted with bench.vm.boot, OUT its rwdir):
    python bench/results/2026-12-07/ipvs-control-run.py OUT
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import control
from bench.__main__ import as_json


def main(out: Path) -> None:
    doc: dict[str, dict[str, Any]] = {}
    for n, runs in ((10, 3), (100, 3), (1000, 2)):
        appliers: dict[str, Callable[[control.Netns], control.Applier]] = {"lb ipvs": control.Ipvs}
        res = asyncio.run(control.measure([n], runs, lambda w: print(w, flush=True), appliers))
        for name, per in as_json(res).items():
            doc.setdefault(name, {}).update(per)
        (out / "ipvs_control.json").write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
