"""A tag's digest for the admission gate, looked up in the registry within bounds.

A review must be answered within the webhook's timeout whatever the registries it names
do, and no review may take the gate's lookups from the others. So:

- one lookup per image at a time, shared by every review that names it (single-flight),
  and its answer cached: a digest for ADMISSION_DIGEST_TTL, a failure for
  ADMISSION_FAILED_LOOKUP_TTL, so that an image on a hostile or broken registry costs
  one lookup per TTL, not one per review;
- at most PER_REVIEW lookups started at once for one review, PER_NAMESPACE for one
  namespace and TOTAL for the replica: a Pod of 150 containers on 150 registries waits
  its turn, and one namespace cannot hold every slot;
- a review stops waiting at its deadline (the webhook timeout less a margin for the
  rest of the answer); the images not resolved by then are unscanned for this review,
  and the policy's `unscanned` rule decides. Their lookups go on in the background
  (bounded by the registry client's whole-request deadline) and serve the next review.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

from scangate.config import Settings
from scangate.core.destinations import Destinations
from scangate.core.durations import parse_duration
from scangate.core.images import ImageRef
from scangate.registry.client import RegistryError
from scangate.registry.configured import base_url, registry_client, shared_connections

log = logging.getLogger("scangate.admission")
PER_REVIEW = 4
PER_NAMESPACE = 8
TOTAL = 32
ANSWER_MARGIN = 1.5
"""Seconds of the webhook timeout kept for judging and answering after the lookups."""
CACHED = 4096

Answer = tuple[str | None, str]
"""A digest, or None and why there is none."""
Resolve = Callable[[ImageRef], Awaitable[str]]
"""One registry lookup: the digest a review judges an image by."""


class DigestLookups:
    def __init__(self, settings: Settings, destinations: Destinations,
                 resolve: Resolve | None = None) -> None:
        self.settings = settings
        self.destinations = destinations
        self._connections = shared_connections(settings, destinations)
        self.resolve = resolve or self._from_registry
        self.digest_ttl = parse_duration(settings.admission_digest_ttl).total_seconds()
        self.failed_ttl = parse_duration(settings.admission_failed_lookup_ttl).total_seconds()
        self.lookup_timeout = float(max(settings.admission_timeout_seconds - 2, 1))
        self._cache: OrderedDict[str, tuple[float, Answer]] = OrderedDict()
        self._running: dict[str, asyncio.Future[Answer]] = {}
        self._slots = asyncio.Condition()
        self._in_flight = 0
        self._per_namespace: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.started = 0
        """Lookups started (for tests and metrics)."""

    def review_deadline(self) -> float:
        """When (time.monotonic) a review starting now stops waiting for lookups."""
        return time.monotonic() + max(self.settings.admission_timeout_seconds - ANSWER_MARGIN,
                                      0.5)

    async def digests(self, refs: Sequence[ImageRef], namespace: str,
                      deadline: float) -> list[Answer]:
        """Each image's digest (its own, a cached one, or a lookup's), in order; an image
        not resolved by `deadline` gets None and says so."""
        own = asyncio.Semaphore(PER_REVIEW)
        tasks = [asyncio.ensure_future(self._one(ref, namespace, own)) for ref in refs]
        if not tasks:
            return []
        await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0))
        answers: list[Answer] = []
        for ref, task in zip(refs, tasks, strict=True):
            if task.done() and not task.cancelled() and task.exception() is None:
                answers.append(task.result())
            else:
                task.cancel()
                answers.append((None, f"the registry did not say which image {ref} is in "
                                      "time for this review"))
        return answers

    async def _one(self, ref: ImageRef, namespace: str, own: asyncio.Semaphore) -> Answer:
        if ref.digest:
            return ref.digest, ""
        key = str(ref)
        held = self._held(key)
        if held is not None:
            return held
        running = self._running.get(key)
        if running is not None:  # joined: it takes no slot of this review's
            return await asyncio.shield(running)
        async with own:  # held until the answer: at most PER_REVIEW of this review at once
            await self._take(namespace)
            # Another review may have started (or finished) it while this one waited.
            held = self._held(key)
            running = self._running.get(key)
            if held is not None or running is not None:
                await self._give(namespace)
            if held is not None:
                return held
            if running is None:
                running = self._start(key, ref, namespace)
            return await asyncio.shield(running)

    def _held(self, key: str) -> Answer | None:
        held = self._cache.get(key)
        if held is not None and held[0] > time.monotonic():
            return held[1]
        return None

    async def _take(self, namespace: str) -> None:
        async with self._slots:
            await self._slots.wait_for(lambda: self._in_flight < TOTAL and
                                       self._per_namespace.get(namespace, 0) < PER_NAMESPACE)
            self._in_flight += 1
            self._per_namespace[namespace] = self._per_namespace.get(namespace, 0) + 1

    async def _give(self, namespace: str) -> None:
        async with self._slots:
            self._in_flight -= 1
            left = self._per_namespace[namespace] - 1
            if left:
                self._per_namespace[namespace] = left
            else:
                del self._per_namespace[namespace]
            self._slots.notify_all()

    def _start(self, key: str, ref: ImageRef, namespace: str) -> asyncio.Future[Answer]:
        """The shared lookup; it holds its slot (taken by the caller) until it ends."""
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        self.started += 1

        async def lookup() -> None:
            answer: Answer = (None, f"the lookup of {ref} was stopped")
            try:
                answer = await self._lookup(ref)
                # A failure is remembered too: a hostile registry costs one lookup per TTL.
                ttl = self.digest_ttl if answer[0] else self.failed_ttl
                self._cache[key] = (time.monotonic() + ttl, answer)
                self._cache.move_to_end(key)
                while len(self._cache) > CACHED:
                    self._cache.popitem(last=False)
            finally:
                del self._running[key]
                future.set_result(answer)
                await self._give(namespace)

        task = asyncio.create_task(lookup())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future

    async def _lookup(self, ref: ImageRef) -> Answer:
        try:
            return await asyncio.wait_for(self.resolve(ref), self.lookup_timeout), ""
        except Exception as e:
            # Whatever went wrong, the shared lookup must end: every review of this image
            # waits on it.
            if not isinstance(e, RegistryError | TimeoutError | OSError):
                log.exception("digest lookup of %s failed", ref)
            why = str(e) or f"no answer within {self.lookup_timeout:g}s"
            return None, f"the registry could not say which image {ref} is: {why}"[:300]

    async def _from_registry(self, ref: ImageRef) -> str:
        client = registry_client(base_url(ref, None, self.settings), {}, None, ref.registry,
                                 self.settings, self.destinations, self._connections)
        async with client:
            resolved = await client.resolve(ref)
        # A multi-platform tag by its index's digest: what the node resolves, whatever its
        # platform, and what pinDigests pins (results answer for both digests).
        return resolved.index_digest or resolved.digest
