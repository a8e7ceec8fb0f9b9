"""Running out of descriptors or memory is a state lb is in, not a crash.

At EMFILE/ENFILE (descriptors) or ENOMEM/ENOBUFS (memory) on accept, connect, a new UDP
flow or a health probe, lb refuses that one piece of new work, counts it here
(`lb_resource_exhausted_total{resource}`), logs at most once per LOG_INTERVAL per
resource with the count in between, keeps what is established, and tries again with the
next piece of work: it recovers by itself once the resource is back.

Descriptors are also budgeted before they run out (`Descriptors`, like HAProxy's maxconn
derived from the descriptor limit): relays and UDP flows may use the limit less what lb
holds for itself (listeners, sockets to the kernel) and less a reserve, so that health
probes and the admin API keep working while clients hold every descriptor the data path
may have. A client past the budget is refused and counted as `exhausted`, as at EMFILE.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import sys
import time

from lb.log import emit

log = logging.getLogger("lb.exhaustion")

#: errno -> the resource it says lb ran out of.
RESOURCE = {
    errno.EMFILE: "descriptors",
    errno.ENFILE: "descriptors",
    errno.ENOMEM: "memory",
    errno.ENOBUFS: "memory",
}
RESOURCES = ("descriptors", "memory")
LOG_INTERVAL = 10.0


def resource_of(e: BaseException) -> str | None:
    """The resource an OSError says is exhausted, or None for any other error."""
    return RESOURCE.get(e.errno) if isinstance(e, OSError) and e.errno else None


class Exhaustion:
    """Counts by resource; one log event per resource per LOG_INTERVAL."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(RESOURCES, 0)
        self._logged: dict[str, float] = {}
        self._unlogged = dict.fromkeys(RESOURCES, 0)

    def note(self, resource: str, what: str, now: float | None = None) -> None:
        """`what` (e.g. "accepting a tcp connection on web") failed for want of `resource`."""
        now = time.monotonic() if now is None else now
        self.counts[resource] += 1
        last = self._logged.get(resource)
        if last is not None and now - last < LOG_INTERVAL:
            self._unlogged[resource] += 1
            return
        more, self._unlogged[resource] = self._unlogged[resource], 0
        self._logged[resource] = now
        emit(
            log,
            logging.ERROR,
            "resource.exhausted",
            f"out of {resource}: {what} refused"
            + (f" (and {more} more since the last report)" if more else "")
            + "; established connections go on",
            resource=resource,
            count=self.counts[resource],
        )


#: The process's one table (like a logger): relays, probes and the metrics share it.
EXHAUSTION = Exhaustion()


#: Descriptors kept out of the data path's budget for probes, the admin API and the kernel
#: dataplanes' tools: the larger of this and a sixteenth of the limit.
RESERVE_MIN = 16


class Descriptors:
    """The data path's descriptor budget: `take` before a relay or flow opens its
    descriptors, `give` them back when it ends; `size` after each change of listeners."""

    def __init__(self) -> None:
        self.in_use = 0
        self.limit = sys.maxsize  # unsized: no budget

    def size(self, soft_limit: int | None = None, open_now: int | None = None) -> None:
        """Set the budget from the descriptor limit and what lb holds outside the data path
        (all its open descriptors less those the data path has taken)."""
        if soft_limit is None:
            soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft_limit == resource.RLIM_INFINITY:
            self.limit = sys.maxsize
            return
        if open_now is None:
            try:
                open_now = len(os.listdir("/proc/self/fd"))
            except OSError:  # no /proc: budget from the limit alone
                open_now = self.in_use
        fixed = max(0, open_now - self.in_use)
        self.limit = max(0, soft_limit - fixed - max(RESERVE_MIN, soft_limit // 16))

    def take(self, n: int) -> bool:
        """Whether `n` more descriptors fit the budget (then they are counted as used)."""
        if self.in_use + n > self.limit:
            return False
        self.in_use += n
        return True

    def give(self, n: int) -> None:
        self.in_use -= n


#: The data path's one budget (process-wide, like EXHAUSTION).
DESCRIPTORS = Descriptors()
