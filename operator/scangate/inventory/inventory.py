"""The inventory of what runs: every image of every running Pod has an ImageScan, and
the ScanPolicies' verdicts on what runs are counted per namespace.

Pods reach it only through the shared cache (`Cache.running_pods`, fed by kopf's
cluster-wide Pod watch in handlers.watches as small projections: workload and images).
It keeps which images run in which namespace (core.running.RunningIndex) and acts on
what changed: an image that starts running in a namespace the gate covers, with no
ImageScan of its digest anywhere, waits in a queue for an ImageScan with trigger
Inventory, asked for the gate's way (scangate.scanrequests) within a token bucket of
its own (INVENTORY_SCAN_RATE), so that at install on a 10,000-pod cluster what already
runs is scanned at that pace, and each image once however many pods run it. The queue
holds one entry per (namespace, image), so it is bounded by what runs.

Only the leader asks for scans and counts (the other replicas keep the index, so a new
leader starts at once). The counts are `scangate_running_images{namespace, verdict}`,
recomputed at most every JUDGE_EVERY seconds when something they depend on changed,
each image judged again only when its ImageScan, the policies or the namespaces did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from scangate import metrics
from scangate.api.imagescan import Trigger
from scangate.cache import Cache
from scangate.config import Settings
from scangate.core.coverage import covers
from scangate.core.images import InvalidReference, parse_image
from scangate.core.policy import Policy, decide
from scangate.core.policystate import NamespaceState, PolicyState
from scangate.core.running import (
    WORKLOAD_API_VERSIONS,
    NewlyVulnerable,
    RunningImage,
    RunningIndex,
    RunningPod,
    Settled,
    needs_scan,
    newly_refused,
    verdict_of,
)
from scangate.core.scanstate import Ref, ScanState, tag_of
from scangate.core.vex import VexState
from scangate.kube import Kube
from scangate.scanrequests import IN_FLIGHT_PHASES, Asked, ScanRequests, ScanResults

log = logging.getLogger("scangate.inventory")
JUDGE_EVERY = 15.0
"""Seconds between recounts of the verdicts on what runs (at most; only when changed)."""
IDLE_LOOK = 5.0
"""Seconds between looks at the queue when nothing wakes it (leadership gained)."""
RESULTS_CACHED = 256
"""Full results held for judging: verdicts are memoised per image, results are not."""


@dataclass(frozen=True)
class Judged:
    """A running image's verdict, and what it was judged with."""

    scan: tuple[Ref, int] | None
    epoch: int
    verdict: str
    db: datetime | None = None
    """The newest vulnerability DB known when it was judged (a policy's staleResults)."""
    settled: Settled | None = None
    """The verdict with the result it judged (None while a scan is under way)."""
    news: tuple[tuple[str, ...], tuple[dict[str, str], ...]] | None = None
    """(policies, new findings): this verdict turned the image newly vulnerable."""


class Inventory:
    def __init__(self, kube: Kube, settings: Settings, cache: Cache) -> None:
        self.settings, self.cache, self.kube = settings, cache, kube
        self.index = RunningIndex()
        self.requests = ScanRequests(kube, cache.scans, Trigger.INVENTORY,
                                     settings.inventory_scan_rate,
                                     settings.inventory_scan_burst)
        self.results = ScanResults(kube, cache.scans, RESULTS_CACHED)
        self.active: Callable[[], bool] = lambda: True
        """Whether this replica leads (scangate.leader): only the leader acts."""
        self.vex: Callable[[], VexState] | None = None
        """The VEX documents as they are now (scangate.vexdocs)."""
        self._waiting: dict[tuple[str, str], RunningImage] = {}
        """(namespace, image key) -> the image, to look at in order."""
        self._news = asyncio.Event()
        self._changed = True
        self._epoch = 0
        """Raised when the policies or namespaces change: every verdict is judged again."""
        self._judged: dict[tuple[str, str], Judged] = {}
        self._settled: dict[tuple[str, str], Settled] = {}
        """The last verdict of each running image made with a result (kept through its
        rescans: a scan under way counts as unscanned)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._counted_db: datetime | None = None
        """The vulnerability DB known at the last count (a new one: verdicts may change,
        under a policy's staleResults)."""
        cache.running_pods.subscribe(self._pod_changed)
        cache.imagescans.subscribe(self._scan_changed)
        cache.namespaces.subscribe(self._namespace_changed)
        cache.scanpolicies.subscribe(self._policy_changed)

    # -- the cache's news ------------------------------------------------------------

    def _pod_changed(self, pod: RunningPod, gone: bool) -> None:
        started = self.index.update(pod, gone)
        for namespace, image in started:
            self._waiting[(namespace, image.key)] = image
        if started:
            self._news.set()
        self._changed = True

    def _scan_changed(self, scan: ScanState, gone: bool) -> None:
        # An image runs by digest, or by tag where the node reports no digest.
        for digest in (*scan.digests, *filter(None, [tag_of(scan.image)])):
            running = self.index.where(digest)
            if not running:
                continue
            self._changed = True
            if gone:  # a running image's scan deleted: look whether it needs another
                self.requests.forget(digest)
                for namespace, image in running:
                    self._waiting[(namespace, image.key)] = image
                self._news.set()

    def _namespace_changed(self, state: NamespaceState, gone: bool) -> None:
        self._epoch += 1
        self._changed = True
        if not gone:  # perhaps covered now (its ignore label removed)
            for image in self.index.in_namespace(state.name):
                self._waiting[(state.name, image.key)] = image
            self._news.set()

    def _policy_changed(self, state: PolicyState, gone: bool) -> None:
        self._epoch += 1
        self._changed = True

    def covered(self, namespace: str) -> bool:
        held = self.cache.namespaces.items.get(("", namespace))
        return covers(self.settings.namespace, namespace,
                      held.labels if held is not None else None)

    # -- work ------------------------------------------------------------------------

    async def run(self) -> None:
        # Dedup needs every ImageScan, and coverage every namespace.
        for store in (self.cache.imagescans, self.cache.namespaces, self.cache.running_pods):
            await store.synced.wait()
        log.info("inventory loaded", extra={"images": len(self.index),
                                            "pods": len(self.index.pods)})
        await asyncio.gather(self._ask_for_scans(), self._count())

    async def _ask_for_scans(self) -> None:
        while True:
            self._news.clear()  # news from now on wakes the wait below
            while self._waiting and self.active():
                (namespace, key), image = next(iter(self._waiting.items()))
                if self._ask(namespace, image) is Asked.SHED:
                    await asyncio.sleep(1 / self.settings.inventory_scan_rate)
                    continue
                self._waiting.pop((namespace, key), None)
                await asyncio.sleep(0)  # a listing's burst never holds the loop
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._news.wait(), IDLE_LOOK)

    def _ask(self, namespace: str, image: RunningImage) -> Asked:
        if not self.index.running(namespace, image.key) or not needs_scan(
                image, self.covered(namespace), self.cache.scans):
            return Asked.HELD
        try:
            ref = parse_image(image.reference)
        except InvalidReference:  # core.running keeps only parsed references
            return Asked.HELD
        asked = self.requests.request(namespace, ref, image.digest)
        if asked is Asked.REQUESTED:
            metrics.INVENTORY_SCANS.labels(asked.value).inc()
            log.info("asked for a scan of a running image", extra={
                "namespace": namespace, "image": image.reference})
        return asked

    async def _count(self) -> None:
        while True:
            await asyncio.sleep(JUDGE_EVERY if self._judged else 1.0)
            if not self.active():
                metrics.RUNNING_IMAGES.clear()
                self._judged.clear()
                self._changed = True
                continue
            if not self._changed and self._counted_db == self.cache.scans.known_db:
                continue
            self._changed, self._counted_db = False, self.cache.scans.known_db
            try:
                await self._recount()
            except Exception:  # counted again at the next change
                log.exception("the inventory could not count what runs")
                self._changed = True

    async def _recount(self) -> None:
        policies = [p.policy for p in self.cache.scanpolicies.items.values()
                    if p.policy is not None]
        wanted = frozenset[str]().union(*(p.scanners for p in policies))
        now = datetime.now(UTC)
        vex = self.vex() if self.vex is not None else None
        judged: dict[tuple[str, str], Judged] = {}
        counts: Counter[tuple[str, str]] = Counter()
        for namespace, image in list(self.index.images()):
            if not self.covered(namespace):
                continue
            key = (namespace, image.key)
            judged[key] = held = await self._judge(namespace, image, policies, wanted, now,
                                                   vex, self._settled.get(key))
            counts[(namespace, held.verdict)] += 1
            if held.news is not None and self._judged.get(key) is not held:
                self._newly_vulnerable(namespace, image, held)
        self._judged = judged
        self._settled = {key: held.settled or self._settled[key]
                         for key, held in judged.items()
                         if held.settled is not None or key in self._settled}
        metrics.RUNNING_IMAGES.clear()
        for (namespace, verdict), count in counts.items():
            metrics.RUNNING_IMAGES.labels(namespace, verdict).set(count)

    def _digest(self, namespace: str, image: RunningImage) -> str | None:
        """The image's digest: the node's, else the one its inventory scan resolved the
        tag to, else the newest another scan of the tag did (the gate's, pinned at
        admission; the node has not reported one)."""
        if image.digest is not None:
            return image.digest
        with contextlib.suppress(InvalidReference):
            own = self.cache.scans.scans.get(
                self.requests.asked(namespace, parse_image(image.reference), None))
            if own is not None and own.digest:
                return own.digest
        resolved = [s for s in self.cache.scans.by_tag(image.reference) if s.digest]
        newest = max(resolved, key=lambda s: s.queued_at or datetime.min.replace(tzinfo=UTC),
                     default=None)
        return newest.digest if newest is not None else None

    async def _judge(self, namespace: str, image: RunningImage, policies: list[Policy],
                     wanted: frozenset[str], now: datetime, vex: VexState | None,
                     before: Settled | None = None) -> Judged:
        digest = self._digest(namespace, image)
        state = self.results.speaking(digest, wanted) if digest is not None else None
        scan = (state.ref, state.version) if state is not None else None
        held = self._judged.get((namespace, image.key))
        known_db = self.cache.scans.known_db
        if (held is not None and held.scan == scan and held.epoch == self._epoch
                and held.db == known_db):
            return held
        result = await self.results.result(digest, wanted) if digest is not None else None
        labels = self.cache.namespaces.items.get(("", namespace))
        decision = decide(policies, {image.reference: result}, namespace,
                          labels.labels if labels is not None else {}, {}, now,
                          scans_namespace=namespace, vex=vex,
                          known_db=known_db)
        verdict = verdict_of(decision)
        settled = (Settled.of(verdict, result) if result is not None and result.phase not in
                   IN_FLIGHT_PHASES else None)
        news = newly_refused(before, decision, result) if settled is not None else None
        return Judged(scan, self._epoch, verdict, known_db, settled, news)

    def _newly_vulnerable(self, namespace: str, image: RunningImage, held: Judged) -> None:
        """Tell the receivers (through the cache: scangate.notify) and record an Event on
        each workload that runs the image."""
        assert held.news is not None and held.settled is not None
        policies, findings = held.news
        workloads = tuple(sorted({pod.workload for pod in self.index.pods.values()
                                  if pod.namespace == namespace
                                  and any(i.key == image.key for i in pod.images)}))
        news = NewlyVulnerable(namespace, image.reference, image.digest, workloads, policies,
                               findings, held.settled.db_updated_at or datetime.now(UTC))
        metrics.NEWLY_VULNERABLE.inc()
        log.warning("a running image is newly vulnerable: %s", news.message,
                    extra={"namespace": namespace, "image": image.reference})
        self.cache.newly_vulnerable.publish(news)
        for workload in workloads:
            api_version = WORKLOAD_API_VERSIONS.get(workload.kind)
            if api_version is None:  # a kind whose API group is not known: no Event
                continue
            # The workload's uid is not in the Pod's projection (and the operator may not
            # read workloads): `kubectl events --for <kind>/<name>` finds it by name.
            task = asyncio.create_task(self._event(
                {"apiVersion": api_version, "kind": workload.kind,
                 "metadata": {"name": workload.name, "namespace": namespace, "uid": ""}},
                news.message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _event(self, workload: dict[str, object], message: str) -> None:
        try:
            await self.kube.event(workload, "Warning", "NewlyVulnerable", message)
        except Exception as e:  # a courtesy: the receivers have been told
            log.warning("could not record a NewlyVulnerable Event on %s: %s",
                        workload.get("kind"), e)
