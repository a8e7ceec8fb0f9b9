"""Shared fixtures (helpers live in tests/support/). Every async test runs on uvloop (the loop
`lb run` uses).

- `topo`: the namespace topology of tests/support/netns.py (client | balancer | backends),
  root needed. Its defaults: CLIENT_IPS and BACKEND_IPS, no VIP placed (lb places it). A
  module or test asks for another shape with `@pytest.mark.topology(**Topology fields)`,
  e.g. `pytest.mark.topology(vip_on="lo", ip_forward=True)`.
- `backends`: TCP and UDP servers on every backend address of `topo` (tests/support/traffic.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import pytest
import uvloop

from tests.support.netns import Topology, topology
from tests.support.root import require_root
from tests.support.traffic import Backends

# The real-kernel tier runs inside a virtme-ng guest (tests/test_kernel_tier.py boots it),
# never directly on the host.
collect_ignore = [] if os.environ.get("LB_KERNEL_TIER") == "1" else ["kernel"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "topology(**fields): the shape of the `topo` fixture (a Topology's fields)"
    )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], object]]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def topo(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """Client, balancer and backend namespaces, shaped by the closest `topology` mark."""
    require_root()
    mark = request.node.get_closest_marker("topology")
    with topology(**(mark.kwargs if mark else {})) as t:
        yield t


@pytest.fixture
async def backends(topo: Topology) -> AsyncIterator[Backends]:
    b = await Backends(topo).start()
    try:
        yield b
    finally:
        b.close()
