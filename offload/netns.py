"""Enter a named network namespace (`ip netns add NAME`) for the duration of a block.

setns on the calling thread only, then back: a socket opened in the block keeps that
namespace for its whole life, which is how one process can hold sockets in several
namespaces (the tests, and the bench, which gives each dataplane a namespace of its own).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block with this thread in network namespace `ns`."""
    with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{ns}") as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
