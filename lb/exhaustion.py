"""Running out of descriptors or memory is a state lb is in, not a crash.

At EMFILE/ENFILE (descriptors) or ENOMEM/ENOBUFS (memory) on accept, connect, a new UDP
flow or a health probe, lb refuses that one piece of new work, counts it here
(`lb_resource_exhausted_total{resource}`), logs at most once per LOG_INTERVAL per
resource with the count in between, keeps what is established, and tries again with the
next piece of work: it recovers by itself once the resource is back.
"""

from __future__ import annotations

import errno
import logging
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
