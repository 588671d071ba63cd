"""A list-then-watch cache feed, as client-go's reflector does it.

One LIST (in pages) at start and after the API server says the watch is too old
(410 Gone); otherwise one long WATCH resumed from the last resourceVersion seen,
with bookmarks so that a quiet resource keeps a fresh one. The stream is read in
a daemon thread (the official client is blocking) and each object is projected
there, so the event loop only receives small projections, never bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from kubernetes.client.exceptions import ApiException

from scangate import metrics

log = logging.getLogger("scangate.watch")
T = TypeVar("T")
Obj = dict[str, Any]

PAGE_SIZE = 100
INITIAL_BACKOFF = 0.5
"""Seconds before a failed list or watch is tried again; doubled up to 30 s."""
"""Objects per LIST page: each page is parsed at once, and a smaller one keeps the
start-up's peak memory down."""
WATCH_SECONDS = 120
READ_TIMEOUT = WATCH_SECONDS + 30


class Gone(Exception):
    """The resourceVersion to resume from is too old: relist."""


@dataclass
class Sink(Generic[T]):
    """Where a feed delivers, on the event loop: a whole listing, or one change."""

    replace: Callable[[list[T]], None]
    upsert: Callable[[T], None]
    delete: Callable[[T], None]


class Feed(Generic[T]):
    """Keeps a Sink current with one resource from LIST and WATCH."""

    def __init__(self, name: str, list_fn: Callable[..., Any], project: Callable[[Obj], T],
                 sink: Sink[T], **selector: Any) -> None:
        self.name = name
        self._list = list_fn
        self._project = project
        self._sink = sink
        self._selector = selector
        self.synced = asyncio.Event()
        self._backoff = INITIAL_BACKOFF

    async def run(self) -> None:
        """Forever; returns only by cancellation."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def worker() -> None:
            try:
                self._run_blocking(loop)
            except BaseException as e:  # pragma: no cover - the loop below never ends
                loop.call_soon_threadsafe(done.set_exception, e)

        threading.Thread(target=worker, name=f"watch-{self.name}", daemon=True).start()
        await done

    def _run_blocking(self, loop: asyncio.AbstractEventLoop) -> None:
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = self._relist(loop)
                version = self._watch(loop, version)
            except Gone:
                log.info("watch of %s expired; relisting", self.name)
                version = None
            except Exception as e:  # a broken stream is retried, never fatal
                log.warning("watch of %s failed (%s); retrying in %.1fs", self.name,
                            e.__class__.__name__, self._backoff)
                time.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, 30.0)

    def _relist(self, loop: asyncio.AbstractEventLoop) -> str:
        items: list[T] = []
        token: str | None = None
        while True:
            kwargs = {"limit": PAGE_SIZE, **self._selector}
            if token:
                kwargs["_continue"] = token
            try:
                response = self._list(**kwargs, _preload_content=False,
                                      _request_timeout=(10, 60))
            except ApiException as e:
                if e.status == 410:  # the continue token expired mid-listing
                    items, token = [], None
                    continue
                raise
            body = json.loads(response.data)
            items += [p for obj in body.get("items") or [] for p in self._projected(obj)]
            token = body.get("metadata", {}).get("continue")
            if not token:
                break
        loop.call_soon_threadsafe(self._deliver_listing, items)
        return str(body["metadata"]["resourceVersion"])

    def _projected(self, obj: Obj) -> list[T]:
        """The object's projection (a list of one); one that cannot be projected is left
        out (and said so), never allowed to fail the listing: a relist that raised for one
        object was retried for ever, and what waited for the feed (the gate's readiness)
        with it."""
        try:
            return [self._project(obj)]
        except Exception as e:
            meta = obj.get("metadata") or {}
            log.warning("%s %s%s left out: %s: %s", self.name,
                        f"{meta['namespace']}/" if meta.get("namespace") else "",
                        meta.get("name"), type(e).__name__, e)
            metrics.OBJECT_FAILURES.labels(self.name, "Unreadable").inc()
            return []

    def _deliver_listing(self, items: list[T]) -> None:
        self._sink.replace(items)
        self.synced.set()

    def _watch(self, loop: asyncio.AbstractEventLoop, version: str) -> str:
        try:
            response = self._list(**self._selector, watch=True, resource_version=version,
                                  allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS,
                                  _preload_content=False, _request_timeout=(10, READ_TIMEOUT))
        except ApiException as e:
            if e.status == 410:
                raise Gone() from None
            raise
        # Connected: the next failure starts its backoff afresh (waiting for a whole
        # watch to end first would let the delays grow across separate outages).
        self._backoff = INITIAL_BACKOFF
        # A watch the API server forgets (its cacher replaced when the CRD changes, say)
        # may hold the connection open and send nothing, or only bookmarks, for ever:
        # the read timeout never fires. Close it once it has outlived its own timeout.
        watchdog = threading.Timer(WATCH_SECONDS + 30, response.close)
        watchdog.daemon = True
        watchdog.start()
        try:
            for line in _lines(response):
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('reason')}")
                new_version = obj.get("metadata", {}).get("resourceVersion")
                if kind in ("ADDED", "MODIFIED"):
                    for projected in self._projected(obj):
                        loop.call_soon_threadsafe(self._sink.upsert, projected)
                elif kind == "DELETED":
                    for projected in self._projected(obj):
                        loop.call_soon_threadsafe(self._sink.delete, projected)
                if new_version:
                    version = str(new_version)
        finally:
            watchdog.cancel()
            response.release_conn()
        return version


def _lines(response: Any) -> Iterator[bytes]:
    """The newline-delimited events of a watch response, as they arrive."""
    pending = b""
    for chunk in response.stream(amt=None, decode_content=False):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from (line for line in complete if line.strip())
    if pending.strip():
        yield pending
