"""PolicyReports of what runs: the leader writes one report per namespace the gate covers,
of its running workloads' images against each ScanPolicy (core.policyreports builds it).

It reads the shared cache only (running Pods, ImageScans, ScanPolicies, namespaces) and
marks the namespaces whose report may have changed: a pod's workload or images, a scan of
an image running there, the namespace's labels; every namespace when a policy changes.
At most every `policy_report_interval` seconds it builds those namespaces' reports and
writes the ones whose content differs from what it last wrote or read (a hash of it), so
an unchanged report costs no API call. A namespace with nothing running (or no longer
covered) loses its report. Only the leader writes; a new leader first lists the reports
labelled as scangate's, so that it neither rewrites what is current nor leaves a stale
one behind.

The report's CRD is not scangate's: while it is not installed the feature is off, said
once in the log (and again if it goes), and looked for again at each pass; the first
pass that finds it lists the reports and writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from kubernetes.client.exceptions import ApiException

from scangate import metrics
from scangate.cache import Cache
from scangate.config import Settings
from scangate.core.coverage import covers
from scangate.core.images import InvalidReference, parse_image
from scangate.core.policy import ImageResult, Policy
from scangate.core.policyreports import (
    MANAGED_BY,
    REPORT_KINDS,
    REPORT_NAME,
    Obj,
    ReportKind,
    build_report,
    content_of,
    image_results,
    workload_images,
)
from scangate.core.policystate import NamespaceState, PolicyState
from scangate.core.running import RunningIndex, RunningPod
from scangate.core.scanstate import ScanState
from scangate.core.vex import VexState
from scangate.kube import Kube
from scangate.scanrequests import ScanResults

log = logging.getLogger("scangate.policyreports")
RESULTS_CACHED = 256


@dataclass
class Written:
    """A report as scangate last wrote (or, at leadership, read) it."""

    content: str
    version: str


class PolicyReports:
    def __init__(self, kube: Kube, settings: Settings, cache: Cache) -> None:
        self.kube, self.settings, self.cache = kube, settings, cache
        self.kind: ReportKind | None = REPORT_KINDS.get(settings.policy_reports)
        self.results = ScanResults(kube, cache.scans, RESULTS_CACHED)
        self.active: Callable[[], bool] = lambda: True
        """Whether this replica leads (scangate.leader): only the leader writes."""
        self.vex: Callable[[], VexState] | None = None
        self.available: bool | None = None
        """Whether the report CRD is installed (None: not looked for yet)."""
        self._pods: dict[str, dict[str, RunningPod]] = {}
        """namespace -> pod name -> the pod."""
        self.index = RunningIndex()
        """Which images run in which namespace: a scan's news marks those namespaces."""
        self._dirty: set[str] = set()
        self._written: dict[str, Written] | None = None
        """namespace -> its report as held; None until listed (as leader)."""
        cache.running_pods.subscribe(self._pod_changed)
        cache.imagescans.subscribe(self._scan_changed)
        cache.namespaces.subscribe(self._namespace_changed)
        cache.scanpolicies.subscribe(self._policy_changed)

    # -- the cache's news ------------------------------------------------------------

    def _pod_changed(self, pod: RunningPod, gone: bool) -> None:
        held = self._pods.setdefault(pod.namespace, {})
        old = held.pop(pod.name, None)
        if not gone:
            held[pod.name] = pod
        elif not held:
            del self._pods[pod.namespace]
        if old is not None and not gone and (old.workload, old.images) == (
                pod.workload, pod.images):
            return  # a status change of the same workload and images
        self.index.update(pod, gone)
        self._dirty.add(pod.namespace)

    def _scan_changed(self, scan: ScanState, gone: bool) -> None:
        keys = list(scan.digests)
        with contextlib.suppress(InvalidReference):  # a running image known by its tag
            ref = parse_image(scan.image)
            keys.append(ref.name + (f":{ref.tag}" if ref.tag else ""))
        for key in keys:
            self._dirty.update(namespace for namespace, _ in self.index.where(key))

    def _namespace_changed(self, state: NamespaceState, gone: bool) -> None:
        self._dirty.add(state.name)

    def _policy_changed(self, state: PolicyState, gone: bool) -> None:
        self._dirty.update(self._pods)
        if self._written is not None:
            self._dirty.update(self._written)

    def covered(self, namespace: str) -> bool:
        held = self.cache.namespaces.items.get(("", namespace))
        return covers(self.settings.namespace, namespace,
                      held.labels if held is not None else None)

    # -- work ------------------------------------------------------------------------

    async def run(self) -> None:
        if self.kind is None:
            log.info("PolicyReports are off (setting policyReports is empty)")
            return
        for store in (self.cache.imagescans, self.cache.namespaces, self.cache.running_pods,
                      self.cache.scanpolicies):
            await store.synced.wait()
        while True:
            if not self.active():
                self._written = None  # another replica writes; listed again when leading
                await asyncio.sleep(1.0)
                continue
            if self._written is None:
                try:
                    await self._start()
                except Exception:  # the API server's trouble: tried again
                    log.exception("the PolicyReports could not be listed")
            if self._written is not None:
                await self._write_dirty()
            await asyncio.sleep(self.settings.policy_report_interval)

    async def _start(self) -> None:
        """Look for the CRD; when it is there, list the reports scangate wrote. Said in the
        log when it comes or goes, not at each look."""
        assert self.kind is not None
        available = await self.kube.crd_exists(self.kind.crd)
        if not available:
            if self.available is not False:  # once, not at each look
                log.warning("PolicyReports are off: the CRD %s is not installed (it comes "
                            "with its own project); looked for again every %g s",
                            self.kind.crd, self.settings.policy_report_interval)
            self.available = False
            return
        await self._load()
        self.available = True
        log.info("PolicyReports on", extra={"api": self.kind.api_version,
                                            "reports": len(self._written or {})})

    async def _load(self) -> None:
        assert self.kind is not None
        selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
        found = await self.kube.list_foreign(self.kind.group, self.kind.version,
                                             self.kind.plural, selector)
        written = {}
        for obj in found:
            meta = obj.get("metadata") or {}
            if meta.get("name") == REPORT_NAME and meta.get("namespace"):
                written[meta["namespace"]] = Written(content_of(obj),
                                                     str(meta.get("resourceVersion") or ""))
        self._written = written
        self._dirty.update(written)
        self._dirty.update(self._pods)

    async def _write_dirty(self) -> None:
        policies = [p.policy for p in self.cache.scanpolicies.items.values()
                    if p.policy is not None]
        vex = self.vex() if self.vex is not None else None
        dirty, self._dirty = self._dirty, set()
        for namespace in sorted(dirty):
            if not self.active():
                self._dirty.update(dirty)
                return
            try:
                await self._write(namespace, policies, vex)
            except Exception as e:  # this namespace again at the next pass
                log.warning("the PolicyReport of %s could not be written: %s: %s",
                            namespace, type(e).__name__, e)
                metrics.POLICY_REPORT_WRITES.labels("failed").inc()
                self._dirty.add(namespace)
                if isinstance(e, ApiException) and e.status == 409:
                    await self._reread(namespace)
                elif isinstance(e, ApiException) and e.status == 404:
                    self._written = None  # the CRD went: looked for again
                    self._dirty.update(dirty)
                    return

    async def _reread(self, namespace: str) -> None:
        """Someone else wrote the report (or a write was lost at a leadership change):
        take it as it is, for the next write's version and comparison."""
        assert self.kind is not None and self._written is not None
        try:
            obj = await self.kube.get_foreign(self.kind.group, self.kind.version,
                                              self.kind.plural, namespace, REPORT_NAME)
        except ApiException:
            return
        if obj is None:
            self._written.pop(namespace, None)
        else:
            self._written[namespace] = Written(content_of(obj), str(
                (obj.get("metadata") or {}).get("resourceVersion") or ""))

    async def _write(self, namespace: str, policies: list[Policy],
                     vex: VexState | None) -> None:
        assert self.kind is not None and self._written is not None
        pods = self._pods.get(namespace, {})
        held = self._written.get(namespace)
        if not pods or not self.covered(namespace):
            if held is not None:
                await self.kube.delete_foreign(self.kind.group, self.kind.version,
                                               self.kind.plural, namespace, REPORT_NAME)
                del self._written[namespace]
                metrics.POLICY_REPORT_WRITES.labels("deleted").inc()
                log.info("PolicyReport of %s deleted (nothing runs there it covers)",
                         namespace)
            return
        report = await self._build(namespace, pods, policies, vex)
        content = content_of(report)
        if held is not None and held.content == content:
            return
        if held is None:
            created = await self.kube.create_foreign(self.kind.group, self.kind.version,
                                                     self.kind.plural, namespace, report)
            if created is None:  # there already: a write lost at a leadership change
                await self._reread(namespace)
                self._dirty.add(namespace)
                return
            obj, result = created, "created"
        else:
            report["metadata"]["resourceVersion"] = held.version
            obj = await self.kube.replace_foreign(self.kind.group, self.kind.version,
                                                  self.kind.plural, namespace, REPORT_NAME,
                                                  report)
            result = "updated"
        self._written[namespace] = Written(
            content, str((obj.get("metadata") or {}).get("resourceVersion") or ""))
        metrics.POLICY_REPORT_WRITES.labels(result).inc()
        log.info("PolicyReport of %s %s", namespace, result, extra={
            "results": len(report["results"]), "summary": report["summary"]})

    async def _build(self, namespace: str, pods: dict[str, RunningPod],
                     policies: list[Policy], vex: VexState | None) -> Obj:
        assert self.kind is not None
        labels = self.cache.namespaces.items.get(("", namespace))
        now = datetime.now(UTC)
        wanted = frozenset[str]().union(*(p.scanners for p in policies))
        results: dict[str, ImageResult | None] = {}
        entries = []
        for workload, images in workload_images(pods.values()).items():
            for image in images:
                if image not in results:
                    results[image] = await self._result(image, wanted)
                entries += image_results(policies, namespace,
                                         labels.labels if labels is not None else {},
                                         workload, image, results[image], now, vex)
            await asyncio.sleep(0)  # a namespace of 1,000 workloads never holds the loop
        return build_report(self.kind, namespace, entries)

    async def _result(self, image: str, wanted: frozenset[str]) -> ImageResult | None:
        """The stored result that speaks for a running image: its digest's (the node's),
        else that of the newest scan of its tag that resolved it."""
        try:
            ref = parse_image(image)
        except InvalidReference:
            return None
        digest = ref.digest
        if digest is None:
            resolved = [s for s in self.cache.scans.by_tag(image) if s.digest]
            newest = max(resolved, key=lambda s: s.queued_at or datetime.min.replace(
                tzinfo=UTC), default=None)
            digest = newest.digest if newest is not None else None
        return await self.results.result(digest, wanted) if digest is not None else None
