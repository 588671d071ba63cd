"""Asking for a scan of an image no ImageScan speaks for, and reading a digest's result:
the one way of each that the admission gate and the inventory share.

An ImageScan asked for this way lives in the namespace of the workload that runs (or
would run) the image, named after its trigger, repository and digest, so that two
replicas, or a restart, asking for the same digest make the same name (the second
create is a 409, not a second scan). Each caller has its own token bucket (the gate's
reviews and the inventory's listing must not starve each other) and remembers what it
asked for, once per digest and scanners however many pods or reviews name it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable
from enum import StrEnum
from typing import Any

from scangate.api import GROUP, VERSION
from scangate.api.imagescan import Phase, Trigger
from scangate.core.images import ImageRef
from scangate.core.policy import ImageResult
from scangate.core.ratelimit import TokenBucket
from scangate.core.scanstate import Ref, ScanIndex, ScanState
from scangate.kube import Kube

log = logging.getLogger("scangate.scanrequests")
IN_FLIGHT_PHASES = frozenset({Phase.PENDING, Phase.QUEUED, Phase.SCANNING})
REQUESTS_REMEMBERED = 4096
_UNSAFE = re.compile(r"[^a-z0-9-]+")


class Asked(StrEnum):
    """What became of a request."""

    REQUESTED = "requested"
    SHED = "shed"
    """Over the caller's rate: ask again later."""
    HELD = "held"
    """Asked for already, or a scan of the digest is in progress: nothing done."""


def scan_name(trigger: Trigger, ref: ImageRef, key: str) -> str:
    readable = _UNSAFE.sub("-", ref.repository.rsplit("/", 1)[-1].lower()).strip("-")
    return (f"{trigger.value.lower()}-{readable[:40]}-"
            f"{hashlib.sha256(key.encode()).hexdigest()[:12]}")


class ScanRequests:
    """ImageScans of one trigger for images with no result, within a token bucket."""

    def __init__(self, kube: Kube, index: ScanIndex, trigger: Trigger, rate: float,
                 burst: int) -> None:
        self.kube, self.index, self.trigger = kube, index, trigger
        self._bucket = TokenBucket(rate, burst)
        self._requested: dict[str, float] = {}
        """Digests (or images) whose scan was asked for, and when: once each."""
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self, namespace: str, ref: ImageRef, digest: str | None,
                scanners: tuple[str, ...] = ()) -> Asked:
        """An ImageScan running `scanners` (default vuln) of the image, pinned to `digest`
        when known, once per digest and scanners (and none while one of that digest is in
        progress)."""
        extra = tuple(s for s in scanners if s != "vuln")
        key = (digest or str(ref)) + (f"|{','.join(scanners)}" if extra else "")
        if key in self._requested or (digest and self.index.in_phase(
                digest, (*IN_FLIGHT_PHASES, None)) is not None):
            return Asked.HELD
        if not self._bucket.take(time.monotonic()):
            return Asked.SHED
        self._requested[key] = time.monotonic()
        while len(self._requested) > REQUESTS_REMEMBERED:
            self._requested.pop(next(iter(self._requested)))
        image = str(ref.with_digest(digest)) if digest else str(ref)
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageScan",
                "metadata": {"name": scan_name(self.trigger, ref, key),
                             "namespace": namespace},
                "spec": {"image": image, "trigger": self.trigger.value,
                         **({"scanners": list(scanners)} if extra else {})}}
        self._background(self.kube.create_custom("imagescans", namespace, body),
                         f"the {self.trigger.value.lower()} scan of {image}", key)
        return Asked.REQUESTED

    def asked(self, namespace: str, ref: ImageRef, digest: str | None) -> Ref:
        """Where the ImageScan `request` makes for the image lives (of the default
        scanners): the digest of an image asked for by tag is read from it."""
        return (namespace, scan_name(self.trigger, ref, digest or str(ref)))

    def forget(self, key: str) -> None:
        """Let `key` (a digest or image) be asked for again (its scan was deleted)."""
        for held in [k for k in self._requested if k == key or k.startswith(f"{key}|")]:
            self._requested.pop(held, None)

    def _background(self, work: Awaitable[Any], what: str, requested: str) -> None:
        """The creation does not hold the caller up; a failure is logged and the image
        may be asked for again."""
        async def run() -> None:
            try:
                await work
            except Exception as e:
                log.warning("could not create %s: %s", what, e)
                self._requested.pop(requested, None)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class ScanResults:
    """A digest's best result as a policy judges it, each ImageScan's read once per
    version (the cache holds no findings: they are read from the API server)."""

    def __init__(self, kube: Kube, index: ScanIndex, size: int) -> None:
        self.kube, self.index, self.size = kube, index, size
        self._results: OrderedDict[tuple[Ref, int], ImageResult] = OrderedDict()

    def speaking(self, digest: str, scanners: frozenset[str] = frozenset()
                 ) -> ScanState | None:
        """The ImageScan that speaks for a digest: the newest completed scan (of those
        made with `scanners`, if any is), else one in progress, else a failed one."""
        return (self.index.newest_vulnerabilities(digest, scanners)
                or self.index.in_phase(digest, IN_FLIGHT_PHASES)
                or self.index.in_phase(digest, (Phase.FAILED,)))

    async def result(self, digest: str, scanners: frozenset[str] = frozenset()
                     ) -> ImageResult | None:
        """The digest's best result (one in progress is unscanned for now)."""
        state = self.speaking(digest, scanners)
        if state is None:
            return None
        if state.phase in IN_FLIGHT_PHASES:
            return ImageResult(phase=state.phase, digest=digest)
        return await self.full(state)

    async def full(self, state: ScanState) -> ImageResult:
        """The ImageScan's result as a policy reads it, fetched once per version."""
        key = (state.ref, state.version)
        held = self._results.get(key)
        if held is not None:
            self._results.move_to_end(key)
            return held
        obj = await self.kube.get_custom("imagescans", state.namespace, state.name)
        result = ImageResult.from_status((obj or {}).get("status") or {})
        self._results[key] = result
        while len(self._results) > self.size:
            self._results.popitem(last=False)
        return result
