"""The operator's one shared cache: what it knows of the cluster, kept current by kopf.

One Store per kind holds typed projections keyed by (namespace, name), never whole
objects: an ImageScan's findings stay in the API server (10,000 of them would be
640 MB here). kopf's event handlers (scangate.handlers.watches) put each change in;
the components (the scan reconciler, the rule controller, the notifier, the gate) read
the stores and subscribe to their changes; none of them calls another.

Two things kopf does not tell its handlers, a Store learns from the listing hook
(scangate.handlers.listing): when the initial listing has been handled (client-go's
HasSynced; the reconciler and the gate wait for it, as acting on half a picture would
scan a digest twice or judge without the policies), and which held objects a relist no
longer has (deleted while the watch was down: kopf sends no DELETED for those).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from scangate import metrics
from scangate.core.policy import Decision
from scangate.core.policystate import (
    NamespaceState,
    PolicyState,
    project_namespace,
    project_policy,
)
from scangate.core.rulestate import RuleState, project_rule
from scangate.core.running import (
    NewlyVulnerable,
    RunningPod,
    is_running,
    project_running_pod,
    slim_pod,
)
from scangate.core.scanstate import (
    RESULT_DETAIL,
    SCAN_LABEL,
    JobState,
    PodState,
    ScanIndex,
    ScanState,
    project_job,
    project_pod,
    project_scan,
    resource_version,
)
from scangate.core.vex import ConfigMapDocuments, project_configmap

log = logging.getLogger("scangate.cache")
T = TypeVar("T")
Obj = dict[str, Any]
Key = tuple[str, str]
Subscriber = Callable[[T, bool], None]
"""Called with an object's projection and whether it is gone."""


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class Store(Generic[T]):
    """One kind: the newest projection of each object, its subscribers, and whether the
    initial listing has been handled (`synced`).

    `hold` and `release` let an index keep the objects instead (the ScanIndex does, for
    ImageScans, scan Jobs and their pods); `hold` answers whether anything changed that
    subscribers act on (the operator's own status write coming back changes nothing)."""

    def __init__(self, kind: str, project: Callable[[Obj], T],
                 hold: Callable[[T], bool] | None = None,
                 release: Callable[[T], object] | None = None,
                 wanted: Callable[[Obj], bool] | None = None,
                 unused: Iterable[str] = (),
                 slim: Callable[[Obj], None] | None = None) -> None:
        self.kind = kind
        self.unused = tuple(unused)
        """Status fields the projection never reads: dropped from each body as kopf's
        stream delivers it (scangate.handlers.listing), before kopf queues it."""
        self.items: dict[Key, T] = {}
        self.synced = asyncio.Event()
        self._project, self._hold, self._release = project, hold, release
        self._wanted = wanted
        self._slim = slim
        """Cuts a body of a kind held in numbers down further (Pods), in place."""
        self._versions: dict[Key, int] = {}
        self._subscribers: list[Subscriber[T]] = []
        self._seen: set[Key] | None = None
        """Keys handled since the current listing began (None outside one)."""
        self._waiting: set[Key] = set()
        """Keys listed whose events have not been handled yet."""
        self._before: set[Key] = set()
        """Keys held when the current listing began."""

    def trim(self, obj: Obj) -> None:
        """Drop from a body, in place, what the projection never reads: the fields
        managers keep (`managedFields`) and `unused` status fields. kopf keeps each body
        in its object's worker until the worker idles out: with 10,000 ImageScans of
        58 KiB findings each, cold start held 480 MiB where the projections take 200."""
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            meta.pop("managedFields", None)
        status = obj.get("status")
        if isinstance(status, dict):
            for name in self.unused:
                status.pop(name, None)
        if self._slim is not None:
            self._slim(obj)

    def subscribe(self, fn: Subscriber[T]) -> None:
        self._subscribers.append(fn)

    # -- kopf's events (scangate.handlers.watches) --------------------------------------

    def event(self, kind: str | None, obj: Obj) -> None:
        """One watch event (kind None: listed), as kopf's handler receives it."""
        key = key_of(obj)
        if kind == "DELETED" or (self._wanted is not None and not self._wanted(obj)):
            self.remove(key)
        else:
            self.apply(obj)
        self._handled(key)

    def apply(self, obj: Obj) -> T | None:
        """Hold the object (from the watch, or read back from the operator's own write):
        its projection, or None when it is older than what is held or cannot be read."""
        key = key_of(obj)
        version = resource_version(obj)
        held = self._versions.get(key)
        if held is not None and 0 <= version < held:
            return None  # the watch's older news, after the operator's own write
        try:
            state = self._project(obj)
        except Exception as e:  # one object's trouble, never the feed's
            log.warning("%s %s/%s left out: %s: %s", self.kind, *key, type(e).__name__, e)
            metrics.OBJECT_FAILURES.labels(self.kind, "Unreadable").inc()
            return None
        self.items[key] = state
        self._versions[key] = version
        if self._hold is None or self._hold(state):
            self._tell(state, False)
        return state

    def remove(self, key: Key) -> None:
        state = self.items.pop(key, None)
        self._versions.pop(key, None)
        if state is None:
            return
        if self._release is not None:
            self._release(state)
        self._tell(state, True)

    def _tell(self, state: T, gone: bool) -> None:
        for fn in self._subscribers:
            try:
                fn(state, gone)
            except Exception:  # the subscriber's trouble: the others still hear of it
                log.exception("a subscriber of %s failed", self.kind)

    # -- the listing (scangate.handlers.listing) ---------------------------------------

    def listing_started(self) -> None:
        self._seen = set()
        self._before = set(self.items)

    def listed(self, keys: set[Key]) -> None:
        """The listing is over: what was held before it began and it did not have is gone,
        and the store is synced once every object it had has been handled. An object held
        since it began came from the operator's own write (an ImageScan it created), which
        the listing's snapshot may predate: it stays, and the watch brings its news."""
        for key in self._before - keys:
            self.remove(key)
        self._before = set()
        self._waiting = keys - (self._seen or set())
        self._seen = None
        if not self._waiting:
            self._synced()

    def _handled(self, key: Key) -> None:
        if self._seen is not None:
            self._seen.add(key)
        elif self._waiting:
            self._waiting.discard(key)
            if not self._waiting:
                self._synced()

    def _synced(self) -> None:
        if not self.synced.is_set():
            log.info("%s loaded", self.kind, extra={"objects": len(self.items)})
            self.synced.set()


class Topic(Generic[T]):
    """Something that happens rather than an object that is: published to subscribers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._subscribers: list[Callable[[T], None]] = []

    def subscribe(self, fn: Callable[[T], None]) -> None:
        self._subscribers.append(fn)

    def publish(self, item: T) -> None:
        for fn in self._subscribers:
            try:
                fn(item)
            except Exception:
                log.exception("a subscriber of %s failed", self.name)


@dataclass(frozen=True)
class Refusal:
    """The gate refused a workload (not a dry run)."""

    decision: Decision
    namespace: str


def _is_scan(obj: Obj) -> bool:
    return SCAN_LABEL in ((obj.get("metadata") or {}).get("labels") or {})


@dataclass
class Cache:
    """Every store, built first in `main` and handed to each component."""

    scans: ScanIndex
    """ImageScans, scan Jobs and their pods, with the indexes reconciler and gate read."""
    imagescans: Store[ScanState] = field(init=False)
    scan_jobs: Store[JobState] = field(init=False)
    scan_pods: Store[PodState] = field(init=False)
    scanrules: Store[RuleState] = field(init=False)
    scanpolicies: Store[PolicyState] = field(init=False)
    namespaces: Store[NamespaceState] = field(init=False)
    configmaps: Store[ConfigMapDocuments] = field(init=False)
    """The operator's namespace's ConfigMaps, read as VEX documents (scangate.vexdocs)."""
    running_pods: Store[RunningPod] = field(init=False)
    """Every running Pod of the cluster, as its workload and images (the inventory's)."""
    refusals: Topic[Refusal] = field(init=False)
    newly_vulnerable: Topic[NewlyVulnerable] = field(init=False)
    """Running images a newer vulnerability DB made refused (the inventory's news)."""

    def __post_init__(self) -> None:
        index = self.scans
        self.imagescans = Store("imagescans", project_scan, index.upsert_scan,
                                lambda s: index.delete_scan(s.ref), unused=RESULT_DETAIL)
        # Scan Jobs and pods carry scangate.dev/scan; anything else in the operator's
        # namespace is not scangate's to look at.
        self.scan_jobs = Store("scan-jobs", project_job, index.upsert_job,
                               lambda j: index.delete_job(j.name), wanted=_is_scan)
        self.scan_pods = Store("scan-pods", project_pod, index.upsert_pod, index.delete_pod,
                               wanted=_is_scan)
        self.scanrules = Store("scanrules", project_rule)
        self.scanpolicies = Store("scanpolicies", project_policy)
        self.namespaces = Store("namespaces", project_namespace)
        self.configmaps = Store("vex-configmaps", project_configmap)
        # What is not running (Pending, Succeeded, Failed) leaves the store: it runs nothing.
        self.running_pods = Store("running-pods", project_running_pod, wanted=is_running,
                                  slim=slim_pod)
        self.refusals = Topic("refusals")
        self.newly_vulnerable = Topic("newly-vulnerable")
