"""Turn a desired service into the ipvsadm-style edits a dataplane applies, in one order.

Every dataplane (the userspace reference and the kernel ones) derives its destination
edits from this one function, so all of them see the same history of adds, edits and
deletes, and their schedulers stay in step.

Order: first the destinations that left the desired state (in list order), then the
desired backends in the file's order. A destination that left is deleted at once if it
has no connections; otherwise it is quiesced (weight 0) and deleted once its active and
inactive connections reach zero (kube-proxy's graceful termination).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lb.model import Backend, Endpoint
from lb.virtual_service import DestView


@dataclass(frozen=True, slots=True)
class AddDest:
    endpoint: Endpoint
    weight: int
    u_threshold: int
    l_threshold: int


@dataclass(frozen=True, slots=True)
class EditDest:
    endpoint: Endpoint
    weight: int
    u_threshold: int
    l_threshold: int


@dataclass(frozen=True, slots=True)
class DelDest:
    endpoint: Endpoint


DestOp = AddDest | EditDest | DelDest


def drained(d: DestView) -> bool:
    return d.conns == 0


def plan_dests(
    current: Sequence[DestView],
    desired: Sequence[Backend],
    may_delete: Callable[[DestView], bool] = drained,
) -> list[DestOp]:
    """The edits that take `current` (kernel list order) to `desired` (file order).

    `may_delete` says when a destination that left may go: by default once it has no
    connections; a dataplane can add a grace timeout."""
    wanted = {b.address for b in desired}
    ops: list[DestOp] = []
    for d in current:
        if d.endpoint in wanted:
            continue
        if may_delete(d):
            ops.append(DelDest(d.endpoint))
        elif d.weight != 0:
            ops.append(EditDest(d.endpoint, 0, d.u_threshold, d.l_threshold))
    have = {d.endpoint: d for d in current}
    for b in desired:
        weight, upper, lower = b.effective_weight, b.max_connections, b.resume_below
        cur = have.get(b.address)
        if cur is None:
            ops.append(AddDest(b.address, weight, upper, lower))
        elif (cur.weight, cur.u_threshold, cur.l_threshold) != (weight, upper, lower):
            ops.append(EditDest(b.address, weight, upper, lower))
    return ops
