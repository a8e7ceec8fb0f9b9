"""Network programming latency of `lb run --source kubernetes` at N Services under churn,
with a `kubernetes.min_sync_period` of one's choice (the bench's k8s part runs lb with its
defaults: 1 s): the bench's own churn (bench/k8s.py, 10 then 100 EndpointSlice updates a
second, 20 s each) against one start of lb per dataplane, its figures as JSON lines.

    PYTHONPATH=. .venv/bin/python bench/results/2026-12-08/k8s-latency.py N PERIOD DATAPLANE...

(as root, from the repository root; PERIOD as the config writes it, e.g. 0.5s)."""

from __future__ import annotations

import asyncio
import json
import sys

from bench import k8s, scale


async def main(n: int, min_sync_period: str, dataplanes: list[str]) -> None:
    k8s.LB_YAML += f"kubernetes:\n  min_sync_period: {min_sync_period}\n"
    # namespaces of its own: the bench's may be in use by a bench run beside it
    setattr(k8s, "namespace", lambda name, dp: scale.namespace(f"{name}-lat", dp))  # noqa: B010
    api = k8s.populated(n)
    for dp in dataplanes:
        result = await k8s.measure_lb(api, dp, 1, quick=False, churn=k8s.Churn(api, n))
        for rate, figures in result.churn.items():
            line = {"services": n, "min_sync_period": min_sync_period, "dataplane": dp}
            print(json.dumps(line | {"rate": rate} | figures), flush=True)
        start = result.figures["start"].as_dict()
        print(json.dumps({"dataplane": dp, "start": start, "failures": result.failures}))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3:]))
