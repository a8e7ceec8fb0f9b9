"""In the guest: lb's IPVS dataplane alone, one change at 10..1,000 services (bench/control.py),
the results written after each size."""
import asyncio, json, sys
sys.path.insert(0, "/work/main")
from bench import control
from bench.__main__ import as_json

out = sys.argv[1]
doc = {}
for n, runs in ((10, 3), (100, 3), (1000, 2)):
    res = asyncio.run(control.measure([n], runs, lambda what: print(what, flush=True), {"lb ipvs": control.Ipvs}))
    for name, per in as_json(res).items():
        doc.setdefault(name, {}).update(per)
    open(f"{out}/ipvs_control.json", "w").write(json.dumps(doc, indent=2))
    print(json.dumps(doc), flush=True)
