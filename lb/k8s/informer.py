"""An informer: the current objects of one resource, kept in step by list + watch.

List (in pages) and take the list's resourceVersion; watch from it, with bookmarks, and
apply each event to the store; when the watch ends, watch again from the last version
seen. A 410 (the version is older than the server keeps) means events were missed:
list again and report the difference between the store and the new list, so that no
object is lost or duplicated. A network or HTTP failure keeps the store as it is (the
balancer serves the last known state) and retries after an exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from lb.k8s.api import ApiError, Gone, Resource
from lb.k8s.translate import ObjectKey, object_key
from lb.log import emit

log = logging.getLogger("lb.k8s")

Object = dict[str, Any]
#: Called for every change of the store: (kind, key, the object now or None if deleted)
OnChange = Callable[[str, ObjectKey, Object | None], None]


class Reader(Protocol):
    async def list_page(
        self, r: Resource, limit: int, continue_token: str | None
    ) -> dict[str, Any]: ...

    def watch(self, r: Resource, resource_version: str) -> AsyncIterator[dict[str, Any]]: ...


@dataclass
class Backoff:
    """Exponential, with jitter, as client-go's (800 ms doubling to 30 s)."""

    initial: float = 0.8
    cap: float = 30.0
    delay: float = 0.0

    def next(self) -> float:
        self.delay = min(self.cap, self.delay * 2 if self.delay else self.initial)
        return self.delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.delay = 0.0


class Informer:
    def __init__(
        self,
        reader: Reader,
        resource: Resource,
        on_change: OnChange,
        *,
        page_size: int = 500,
        backoff: Backoff | None = None,
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.reader = reader
        self.resource = resource
        self.on_change = on_change
        self.page_size = page_size
        self.backoff = backoff or Backoff()
        self.on_error = on_error  # (kind, reason) for metrics
        self.store: dict[ObjectKey, Object] = {}
        self.synced = asyncio.Event()  # listed at least once
        self.resource_version = ""
        self.lists = 0
        self.watches = 0

    @property
    def kind(self) -> str:
        return self.resource.kind

    async def run(self) -> None:
        """Forever: list, then watch; re-list on 410; back off on failures."""
        listed = False
        while True:
            try:
                if not listed:
                    await self._list()
                    listed = True
                await self._watch()
                self.backoff.reset()  # the server ended a healthy watch: watch again now
            except Gone as e:
                emit(
                    log,
                    logging.INFO,
                    "k8s.relist",
                    f"{e}: listing {self.kind}s again",
                    kind=self.kind,
                )
                self._failed("gone")
                listed = False
            except ApiError as e:
                delay = self.backoff.next()
                emit(
                    log,
                    logging.WARNING,
                    "k8s.unavailable",
                    f"{e}; serving the last known {self.kind}s, retrying in {delay:.1f}s",
                    kind=self.kind,
                    retry_in=round(delay, 2),
                )
                self._failed("error")
                await asyncio.sleep(delay)

    def _failed(self, reason: str) -> None:
        if self.on_error is not None:
            self.on_error(self.kind, reason)

    async def _list(self) -> None:
        """All pages, then the store replaced by them, reporting each difference."""
        items: dict[ObjectKey, Object] = {}
        token: str | None = None
        version = ""
        while True:
            page = await self.reader.list_page(self.resource, self.page_size, token)
            for obj in page.get("items") or []:
                items[object_key(obj)] = obj
            meta = page.get("metadata") or {}
            version = version or str(meta.get("resourceVersion") or "")
            token = meta.get("continue") or None
            if token is None:
                break
        self.lists += 1
        old, self.store = self.store, items
        for key in old.keys() - items.keys():
            self.on_change(self.kind, key, None)
        for key, obj in items.items():
            was = old.get(key)
            if was is None or was != obj:
                self.on_change(self.kind, key, obj)
            else:  # unchanged: the very object it was (the translation's memo knows it)
                items[key] = was
        self.resource_version = version
        self.synced.set()

    async def _watch(self) -> None:
        self.watches += 1
        async for event in self.reader.watch(self.resource, self.resource_version):
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                code = obj.get("code")
                message = obj.get("message") or "watch error"
                if code == 410:
                    raise Gone(f"{self.kind}s: {message}")
                raise ApiError(f"watching {self.kind}s: {code} {message}")
            version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            if kind == "BOOKMARK":
                self.resource_version = version or self.resource_version
                continue
            key = object_key(obj)
            if kind in ("ADDED", "MODIFIED"):
                if self.store.get(key) != obj:
                    self.store[key] = obj
                    self.on_change(self.kind, key, obj)
            elif kind == "DELETED":
                if self.store.pop(key, None) is not None:
                    self.on_change(self.kind, key, None)
            else:
                raise ApiError(f"watching {self.kind}s: unknown event type {kind!r}")
            self.resource_version = version or self.resource_version
