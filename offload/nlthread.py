"""A thread with asyncio's own event loop for pyroute2.

pyroute2's async netlink sockets open through `loop.create_datagram_endpoint`, which uvloop
cannot do for AF_NETLINK. lb runs on uvloop, so every pyroute2 object lives on a standard
selector loop in a thread of its own, and lb awaits its results from the main loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class NetlinkThread:
    _shared: NetlinkThread | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.SelectorEventLoop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="netlink", daemon=True)
        self.thread.start()

    @classmethod
    def shared(cls) -> NetlinkThread:
        with cls._guard:
            if cls._shared is None or not cls._shared.thread.is_alive():
                cls._shared = cls()
            return cls._shared

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the netlink loop; await its result from any other loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))
