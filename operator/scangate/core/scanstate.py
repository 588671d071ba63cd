"""The operator's in-memory picture of ImageScans and scan Jobs, kept from watch events.

Each object is held as a small projection (what the queue, the digest index and
admission need; never the findings), and every derived index is updated by the
event that changes it, so that a reconciliation pass costs what is pending,
queued or scanning, never what is stored. Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from scangate.api.common import SeverityCounts
from scangate.api.imagescan import ImageScan, ImageScanStatus, Phase
from scangate.core.images import ImageRef, InvalidReference, parse_image

SEVERITY_KEYS = ("critical", "high", "medium", "low", "unknown")
RESULT_DETAIL = ("findings", "vulnerabilityIndex", "failedChecks", "secrets",
                 "suppressedFindings")
"""The ImageScan status fields of a result's detail, read only from the API server when
needed (a reused result, a notification, admission's message), never held here."""
SCAN_LABEL = "scangate.dev/imagescan"
SCAN_NOW = "scangate.dev/scan-now"
"""The annotation whose each new value runs a ScanRule again."""
"""On scan Jobs and their pods: the ImageScan's name (as a label value)."""
SCAN_NAMESPACE_LABEL = "scangate.dev/imagescan-namespace"
SCAN_UID_LABEL = "scangate.dev/imagescan-uid"
SCAN_ANNOTATION = "scangate.dev/imagescan"
"""On scan Jobs: `namespace/name` of the ImageScan (a name may be too long for a label)."""
Ref = tuple[str, str]
"""(namespace, name)"""


def stamp(moment: datetime) -> str:
    """A Kubernetes timestamp (RFC 3339, UTC, seconds): parse_time's inverse."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def tag_of(image: str) -> str | None:
    """registry/repository:tag of a reference that names a tag (a digest beside it left
    out), normalised as the gate's pinned references are; None without a tag."""
    try:
        ref = parse_image(image)
    except InvalidReference:
        return None
    return str(ImageRef(ref.registry, ref.repository, ref.tag)) if ref.tag else None


def scan_key(digest: str, scanners: Iterable[str], ignore_unfixed: bool) -> str:
    """What makes two results interchangeable: the digest and the options of the scan."""
    return f"{digest}|{','.join(sorted(scanners))}|{'unfixed-ignored' if ignore_unfixed else 'all'}"


def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _counts(value: SeverityCounts | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    return (value.critical, value.high, value.medium, value.low, value.unknown, value.total)


def resource_version(obj: dict[str, Any]) -> int:
    """resourceVersion as a number to order events (etcd's revisions; -1 if not one)."""
    try:
        return int(obj.get("metadata", {}).get("resourceVersion", -1))
    except (TypeError, ValueError):
        return -1


@dataclass(frozen=True, slots=True)
class ScanState:
    """What the operator keeps of one ImageScan."""

    namespace: str
    name: str
    uid: str = ""
    generation: int = 0
    version: int = -1
    """resourceVersion, to drop events older than what is held."""
    image: str = ""
    rule: str | None = None
    """spec.ruleRef: the ScanRule whose registry settings the scan uses."""
    owner: str | None = None
    """The ScanRule that created the scan and keeps it (its controller owner reference);
    scans a user made with a ruleRef are the user's."""
    scanners: tuple[str, ...] = ("vuln",)
    ignore_unfixed: bool = False
    platform: str | None = None
    timeout: str | None = None
    phase: str | None = None
    digest: str | None = None
    index_digest: str | None = None
    """The multi-platform index the scanned manifest was chosen from, if any."""
    attempts: int = 0
    queued_at: datetime | None = None
    start_time: datetime | None = None
    scanned_at: datetime | None = None
    retry_after: datetime | None = None
    job_name: str | None = None
    job_uid: str | None = None
    """The uid of the Job the operator created for the attempt under way (status.jobUID):
    only that Job's pod is read."""
    result_key: str | None = None
    """The key of the stored result: its digest and the options it was produced with."""
    summary: tuple[int, ...] | None = None
    """critical, high, medium, low, unknown, total."""
    fixable: tuple[int, ...] | None = None
    ready: tuple[str, str] | None = None
    """The Ready condition's status and lastTransitionTime."""
    claimed: bool = False
    """Changed by the operator ahead of the API (see ScanIndex.upsert_scan)."""
    completion_time: datetime | None = None
    notified: tuple[tuple[str, str], ...] = ()
    """(receiver, event key) of the notifications delivered about this scan."""
    rescan_request: str | None = None
    """status.rescanRequest: each new value asks for a rescan (a push, a tag moved)."""
    rescan_answered: str | None = None
    """status.rescanAnswered: the request the last lookup of the tag answered."""
    db_updated_at: datetime | None = None
    """status.scannedWith.dbUpdatedAt: the vulnerability DB the result was made with (None:
    not said, a result made before scangate recorded it, or no vulnerability scan)."""

    def made_before(self, db: datetime | None) -> bool:
        """Whether the result was made with a vulnerability DB older than `db` (the one
        the operator knows now). A result that does not say is not judged by its DB: it
        ages out by the rescan interval (an upgrade does not rescan everything at once)."""
        return (db is not None and self.db_updated_at is not None and "vuln" in self.scanners
                and self.db_updated_at < db)

    @property
    def rescan_requested(self) -> bool:
        return self.rescan_request is not None and self.rescan_request != self.rescan_answered

    @property
    def event_key(self) -> str | None:
        """The identity of the scan's latest outcome, for notifications: the same across
        restarts, new with each completion or failure. With the digest: the times have
        whole seconds only, and a tag pushed again can be scanned within the same one."""
        if self.phase not in (Phase.COMPLETED, Phase.FAILED):
            return None
        when = self.completion_time or self.scanned_at
        return f"{self.uid}/{self.phase}/{self.digest or ''}/{when.isoformat() if when else ''}"

    @property
    def ref(self) -> Ref:
        return (self.namespace, self.name)

    @property
    def digests(self) -> tuple[str, ...]:
        """The digests the result answers for: the manifest's, and its index's."""
        held = (self.digest, self.index_digest) if self.digest else ()
        return tuple(dict.fromkeys(d for d in held if d))

    @property
    def key(self) -> str | None:
        """The key this scan asks for now (its digest with its spec's options)."""
        return scan_key(self.digest, self.scanners, self.ignore_unfixed) if self.digest else None

    @property
    def result_scanners(self) -> frozenset[str]:
        """The scanners the stored result was made with (none without a result)."""
        if not self.result_key:
            return frozenset()
        return frozenset(filter(None, self.result_key.split("|")[1].split(",")))

    def same_as(self, other: ScanState | None) -> bool:
        """Equal but for the resourceVersion: an event that changes nothing we act on."""
        return other is not None and replace(other, version=self.version) == self


def project_scan(obj: dict[str, Any]) -> ScanState:
    """The projection of an ImageScan object, read through its API type (the one that
    makes the CRD): what the type cannot read raises its ValidationError, and the cache
    leaves the object out and counts it. A result's detail is not read (nor validated)."""
    status = obj.get("status")
    if isinstance(status, dict) and any(k in status for k in RESULT_DETAIL):
        obj = {**obj, "status": {k: v for k, v in status.items() if k not in RESULT_DETAIL}}
    scan = ImageScan.model_validate(obj)
    meta, spec = scan.metadata, scan.spec
    done = scan.status or ImageScanStatus()
    scanners = tuple(str(s) for s in spec.scanners or ()) or ("vuln",)
    result_key = None
    if done.summary is not None and done.digest:
        # A result made before scannedWith existed was made with the spec's options.
        used = done.scanned_with
        result_key = (scan_key(done.digest, [str(s) for s in used.scanners] or ["vuln"],
                               used.ignore_unfixed) if used is not None else
                      scan_key(done.digest, scanners, bool(spec.ignore_unfixed)))
    owner = next((o.get("name") for o in _dicts(meta.get("ownerReferences"))
                  if o.get("kind") == "ScanRule" and o.get("controller")), None)
    ready = next((c for c in done.conditions or () if c.type == "Ready"), None)
    return ScanState(
        namespace=str(meta.get("namespace", "")), name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")), generation=_int(meta.get("generation")),
        version=resource_version(obj), image=spec.image,
        rule=spec.rule_ref.name if spec.rule_ref else None,
        owner=str(owner) if owner else None,
        scanners=scanners, ignore_unfixed=bool(spec.ignore_unfixed),
        platform=spec.platform, timeout=spec.timeout,
        phase=done.phase, digest=done.digest,
        index_digest=done.index_digest if done.digest else None,
        attempts=done.attempts or 0,
        queued_at=done.queued_at or parse_time(meta.get("creationTimestamp")),
        start_time=done.start_time, scanned_at=done.scanned_at,
        retry_after=done.retry_after, job_name=done.job_name, job_uid=done.job_uid,
        result_key=result_key, summary=_counts(done.summary), fixable=_counts(done.fixable),
        ready=(ready.status, stamp(ready.last_transition_time)
               if ready.last_transition_time else "") if ready else None,
        completion_time=done.completion_time,
        notified=tuple(sorted((k, v.key) for k, v in (done.notified or {}).items())),
        rescan_request=done.rescan_request, rescan_answered=done.rescan_answered,
        db_updated_at=done.scanned_with.db_updated_at if done.scanned_with else None,
    )


def _dicts(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []



@dataclass(frozen=True, slots=True)
class JobState:
    """What the operator keeps of one scan Job. Scan Jobs live in the operator's own
    namespace (tenants cannot create pods there), so they are known by name alone; the
    scan a Job is for is told by the labels the operator set when it created it."""

    name: str
    scan: Ref
    """The ImageScan it scans (namespace, name)."""
    scan_uid: str = ""
    uid: str = ""
    version: int = -1
    finished: str | None = None
    """'Complete' or 'Failed' once the Job has finished."""
    deadline_exceeded: bool = False

    def scans(self, s: ScanState) -> bool:
        """Whether this is the Job of `s`'s attempt under way: the scan it names by UID,
        and the very Job recorded when it was created, not one that took its name."""
        return (self.name == s.job_name and self.scan == s.ref and self.scan_uid == s.uid
                and (s.job_uid is None or self.uid == s.job_uid))


def project_job(obj: dict[str, Any]) -> JobState:
    meta = obj.get("metadata") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    namespace = str(labels.get(SCAN_NAMESPACE_LABEL, ""))
    ref = str(annotations.get(SCAN_ANNOTATION, ""))
    name = ref.split("/", 1)[1] if ref.startswith(f"{namespace}/") else ""
    finished, deadline = None, False
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            finished = c["type"]
            deadline = deadline or c.get("reason") == "DeadlineExceeded"
    return JobState(name=str(meta.get("name", "")), scan=(namespace, name),
                    scan_uid=str(labels.get(SCAN_UID_LABEL, "")), uid=str(meta.get("uid", "")),
                    version=resource_version(obj), finished=finished,
                    deadline_exceeded=deadline)


@dataclass(frozen=True, slots=True)
class PodState:
    """What the operator keeps of one scan pod: whether its Job's work is done, or was
    cut short by the memory limit."""

    name: str
    job: str
    job_uid: str = ""
    """The uid of the Job that controls it (its owner reference)."""
    succeeded: bool = False
    oom_killed: bool = False
    """Its container was killed for exceeding its memory limit (reason OOMKilled)."""


def project_pod(obj: dict[str, Any]) -> PodState:
    meta = obj.get("metadata") or {}
    owner: dict[str, Any] = next((o for o in meta.get("ownerReferences") or []
                                  if o.get("kind") == "Job" and o.get("controller")), {})
    status = obj.get("status") or {}
    # The malware step is an init container: killed at its limit, Trivy never starts.
    oom_killed = any(((c.get("state") or {}).get("terminated") or {}).get("reason") == "OOMKilled"
                     for c in [*(status.get("initContainerStatuses") or []),
                               *(status.get("containerStatuses") or [])])
    return PodState(name=str(meta.get("name", "")), job=str(owner.get("name", "")),
                    job_uid=str(owner.get("uid", "")),
                    succeeded=status.get("phase") == "Succeeded", oom_killed=oom_killed)


# -- what a pass decides ---------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    scan: ScanState


@dataclass(frozen=True)
class Reuse:
    scan: ScanState
    source: ScanState


@dataclass(frozen=True)
class Requeue:
    """A completed result has gone stale: resolve the tag again and scan."""

    scan: ScanState


Action = Start | Reuse | Requeue


@dataclass
class Newest:
    """Scans with a time each, and which is newest, kept as they come and go.

    Many scans can hold results of one digest (thousands, in the scale benchmark), and
    every queued scan and every admission review asks for the newest: O(1), but for
    the removal of the newest itself, which costs one pass when next asked."""

    times: dict[Ref, datetime] = field(default_factory=dict)
    _top: Ref | None = None
    _stale: bool = False

    def add(self, ref: Ref, when: datetime) -> None:
        before = self.times.get(ref)
        self.times[ref] = when
        if self._stale:
            return
        if self._top is None or when >= self.times[self._top]:
            self._top = ref
        elif self._top == ref and before is not None and when < before:
            self._stale = True

    def remove(self, ref: Ref) -> None:
        if self.times.pop(ref, None) is not None and ref == self._top:
            self._top, self._stale = None, True

    def newest(self) -> tuple[Ref, datetime] | None:
        if self._stale:
            self._top = max(self.times, key=self.times.__getitem__, default=None)
            self._stale = False
        return None if self._top is None else (self._top, self.times[self._top])


def _add(index: dict[str, Newest], key: str, ref: Ref, when: datetime) -> None:
    index.setdefault(key, Newest()).add(ref, when)


def _remove(index: dict[str, Newest], key: str, ref: Ref) -> None:
    held = index.get(key)
    if held is not None:
        held.remove(ref)
        if not held.times:
            del index[key]


DB_LAG_RETRY = timedelta(minutes=10)
"""How long a result made with an older DB than the one known, after it was known, waits
before its next rescan (the scanner it came from had not loaded the new DB yet)."""
DELETED_REMEMBERED = 10_000
"""Deleted ImageScans remembered by UID, so that a write answered late cannot revive one."""


@dataclass
class ScanIndex:
    """ImageScans and scan Jobs with the indexes the reconciler and admission read."""

    rescan_interval: timedelta
    scans: dict[Ref, ScanState] = field(default_factory=dict)
    jobs: dict[str, JobState] = field(default_factory=dict)
    """Scan Jobs by name (all in the operator's namespace)."""
    _running: set[str] = field(default_factory=set)
    _pending: dict[Ref, ScanState] = field(default_factory=dict)
    _queued: dict[Ref, ScanState] = field(default_factory=dict)
    _scanning: dict[Ref, ScanState] = field(default_factory=dict)
    _in_flight: dict[str, set[Ref]] = field(default_factory=dict)
    _results: dict[str, Newest] = field(default_factory=dict)
    """Completed results by key: which scans hold one, and when it was made."""
    _vulnerabilities: dict[str, Newest] = field(default_factory=dict)
    """Completed vulnerability results by digest (admission judges by the newest)."""
    _by_digest: dict[str, dict[str | None, set[Ref]]] = field(default_factory=dict)
    """ImageScans by digest, then by phase."""
    _by_tag: dict[str, set[Ref]] = field(default_factory=dict)
    """ImageScans by the tag they name (registry/repository:tag, with or without a digest
    pinned beside it)."""
    _rescans: dict[Ref, ScanState] = field(default_factory=dict)
    """Settled scans asked to scan again (status.rescanRequest)."""
    _by_rule: dict[Ref, set[str]] = field(default_factory=dict)
    """ImageScan names by the ScanRule (namespace, name) that owns them."""
    _expiry: list[tuple[datetime, Ref, datetime]] = field(default_factory=list)
    """Completed results by the time they go stale (a heap; entries checked when popped)."""
    _succeeded: dict[str, PodState] = field(default_factory=dict)
    """Jobs whose pod has succeeded (-> the pod): their result is ready to collect up to
    a second before the Job controller marks the Job complete."""
    _oom_killed: dict[str, PodState] = field(default_factory=dict)
    """Jobs whose pod was killed at its memory limit (-> the pod): why the Job failed."""
    _unclaimed: dict[str, datetime | None] = field(default_factory=dict)
    """Jobs to check for an ImageScan of their own (new, or their scan deleted), and since
    when they have had none (see orphan_jobs)."""
    _jobs_of: dict[str, set[str]] = field(default_factory=dict)
    """Job names by the uid of the ImageScan they scan."""
    _gone: set[str] = field(default_factory=set)
    """Jobs deleted while their scan was Scanning: lost at once, without a grace period."""
    _deleted: dict[str, None] = field(default_factory=dict)
    """UIDs of ImageScans deleted, the newest DELETED_REMEMBERED (insertion-ordered)."""
    totals: dict[str, list[int]] = field(default_factory=dict)
    """Finding counts by namespace over the latest results: critical..unknown, total."""
    known_db: datetime | None = None
    """The vulnerability DB the scanner serves now, as the operator last saw it (its
    UpdatedAt; set by scangate.scanning.dbwatch): a result made with an older one is
    rescanned, and only a result made with this one is reused for another scan."""
    _known_since: datetime | None = None
    """When the operator learned of known_db."""

    # -- events --------------------------------------------------------------------

    def upsert_scan(self, state: ScanState, claim: bool = False) -> bool:
        """Apply an ImageScan event; False when it is older than what is held or changes
        nothing the operator acts on (its own status write coming back, say).

        `claim`: the operator's own change of the version held (a Job starting, before
        the API knows). An event of the version held is then old news: it would undo
        the claim, and a second scan of the same digest could start."""
        if state.uid and state.uid in self._deleted:
            # The operator's own status write answered after the scan's deletion: held
            # again, it would be a result nobody can read, reused by every scan of its
            # digest for ever.
            return False
        old = self.scans.get(state.ref)
        if old is not None and not claim and 0 <= state.version <= old.version and (
                state.version < old.version or old.claimed):
            return False
        state = replace(state, claimed=claim) if claim != state.claimed else state
        if state.same_as(old):
            self.scans[state.ref] = state
            return False
        if old is not None:
            self._forget(old)
            if old.job_name and (state.phase, state.job_name) != (Phase.SCANNING, old.job_name):
                self._gone.discard(old.job_name)
        self.scans[state.ref] = state
        self._index(state, old)
        return True

    def delete_scan(self, ref: Ref) -> bool:
        old = self.scans.pop(ref, None)
        if old is not None:
            if old.uid:
                self._deleted[old.uid] = None
                if len(self._deleted) > DELETED_REMEMBERED:
                    del self._deleted[next(iter(self._deleted))]
            self._forget(old)
            self._gone.discard(old.job_name or "")
            for job in self._jobs_of.get(old.uid, ()):
                self._unclaimed.setdefault(job, None)
        return old is not None

    def upsert_job(self, job: JobState) -> bool:
        old = self.jobs.get(job.name)
        if old is not None and 0 <= job.version < old.version:
            return False
        self.jobs[job.name] = job
        if old is None or old.scan_uid != job.scan_uid:
            if old is not None:
                self._unindex_job(old)
            self._jobs_of.setdefault(job.scan_uid, set()).add(job.name)
            self._unclaimed.setdefault(job.name, None)
        if job.finished is None:
            self._running.add(job.name)
        else:
            self._running.discard(job.name)
        return old is None or (old.finished, old.scan, old.uid) != (job.finished, job.scan,
                                                                     job.uid)

    def expect_job(self, job: JobState) -> None:
        """Hold a Job about to be created, so that it counts against the limit now.
        A Job of that name already held stays: it is an earlier attempt's (a replica that
        died between creating it and recording it), and its watch may have nothing more
        to say, such as its having finished."""
        if job.name not in self.jobs:
            self.upsert_job(job)

    def delete_job(self, name: str) -> bool:
        self._running.discard(name)
        self._unclaimed.pop(name, None)
        job = self.jobs.pop(name, None)
        if job is not None:
            self._unindex_job(job)
            scan = self._scanning.get(job.scan)
            if scan is not None and scan.job_name == job.name:
                self._gone.add(name)
        return job is not None

    def _unindex_job(self, job: JobState) -> None:
        names = self._jobs_of.get(job.scan_uid)
        if names is not None:
            names.discard(job.name)
            if not names:
                del self._jobs_of[job.scan_uid]

    def orphan_jobs(self, now: datetime, grace: timedelta) -> list[str]:
        """Jobs with no ImageScan of their own, to delete (an ImageScan in a tenant's
        namespace cannot own a Job in the operator's, so the garbage collector does not).
        A Job whose scan was deleted is an orphan at once; one whose scan is not held at
        all, after `grace` (a new leader's watch of ImageScans may lag behind its watch of
        Jobs). Each Job is looked at when it comes or its scan goes, not at every pass."""
        found = []
        for name, since in list(self._unclaimed.items()):
            job = self.jobs.get(name)
            scan = self.scans.get(job.scan) if job is not None else None
            if job is None or (scan is not None and scan.uid == job.scan_uid):
                del self._unclaimed[name]
            elif job.scan_uid in self._deleted or (since is not None and now - since > grace):
                found.append(name)
            elif since is None:
                self._unclaimed[name] = now
        return found

    def upsert_pod(self, pod: PodState) -> bool:
        if pod.oom_killed and pod.job:  # a terminal state: kept until the pod goes
            self._oom_killed[pod.job] = pod
        if pod.succeeded and pod.job:
            changed = pod.job not in self._succeeded
            self._succeeded[pod.job] = pod
            return changed
        return self._unsucceed(pod)

    def delete_pod(self, pod: PodState) -> bool:
        oom = self._oom_killed.get(pod.job)
        if oom is not None and oom.name == pod.name:
            del self._oom_killed[pod.job]
        return self._unsucceed(pod)

    def _unsucceed(self, pod: PodState) -> bool:
        held = self._succeeded.get(pod.job)
        if held is None or held.name != pod.name:
            return False
        del self._succeeded[pod.job]
        return True

    def oom_killed(self, job: str, job_uid: str) -> bool:
        """Whether the pod of the Job (by its uid) was killed at its memory limit."""
        pod = self._oom_killed.get(job)
        return pod is not None and pod.job_uid == job_uid

    def replace_pods(self, pods: Iterable[PodState]) -> None:
        self._succeeded, self._oom_killed = {}, {}
        for pod in pods:
            self.upsert_pod(pod)

    def replace_scans(self, states: Iterable[ScanState]) -> None:
        """A relist: what it holds is the whole truth, so the rest was deleted meanwhile."""
        seen = set()
        for state in states:
            seen.add(state.ref)
            self.upsert_scan(state)
        for ref in [r for r in self.scans if r not in seen]:
            self.delete_scan(ref)

    def replace_jobs(self, jobs: Iterable[JobState]) -> None:
        seen = set()
        for job in jobs:
            seen.add(job.name)
            self.upsert_job(job)
        for name in [n for n in self.jobs if n not in seen]:
            self.delete_job(name)

    def _index(self, s: ScanState, old: ScanState | None) -> None:
        if s.phase in (None, Phase.PENDING):
            self._pending[s.ref] = s
        elif s.phase == Phase.QUEUED and s.key:
            self._queued[s.ref] = s
        elif s.phase == Phase.SCANNING:
            self._scanning[s.ref] = s
            if s.key:
                self._in_flight.setdefault(s.key, set()).add(s.ref)
        if s.rescan_requested and s.phase in (Phase.COMPLETED, Phase.FAILED):
            self._rescans[s.ref] = s
        for digest in s.digests:
            self._by_digest.setdefault(digest, {}).setdefault(s.phase, set()).add(s.ref)
        if tag := tag_of(s.image):
            self._by_tag.setdefault(tag, set()).add(s.ref)
        if s.owner:
            self._by_rule.setdefault((s.namespace, s.owner), set()).add(s.name)
        if s.phase == Phase.COMPLETED and s.scanned_at and "vuln" in s.scanners:
            for digest in s.digests:
                _add(self._vulnerabilities, digest, s.ref, s.scanned_at)
        if s.phase == Phase.COMPLETED and s.result_key and s.scanned_at:
            _add(self._results, s.result_key, s.ref, s.scanned_at)
            if s.key != s.result_key:  # its options were edited: scan with the new ones
                self.requeue_at(s, s.scanned_at)
            elif s.made_before(self.known_db):
                # A newer DB is out: scan again now. A result made after the operator
                # learned of it, with an older one, is a scanner that has not loaded it
                # yet (another server replica): again later, not in a loop.
                late = self._known_since is not None and s.scanned_at > self._known_since
                self.requeue_at(s, s.scanned_at + (DB_LAG_RETRY if late else timedelta(0)))
            elif old is None or (old.phase, old.scanned_at) != (s.phase, s.scanned_at):
                self.requeue_at(s, s.scanned_at + self.rescan_interval)
        if s.summary is not None:
            counts = self.totals.setdefault(s.namespace, [0] * 6)
            for i, n in enumerate(s.summary):
                counts[i] += n

    def _forget(self, s: ScanState) -> None:
        self._pending.pop(s.ref, None)
        self._queued.pop(s.ref, None)
        self._scanning.pop(s.ref, None)
        self._rescans.pop(s.ref, None)
        if s.key and s.key in self._in_flight:
            self._in_flight[s.key].discard(s.ref)
            if not self._in_flight[s.key]:
                del self._in_flight[s.key]
        for digest in s.digests:
            phases = self._by_digest.get(digest, {})
            if s.phase in phases:
                phases[s.phase].discard(s.ref)
                if not phases[s.phase]:
                    del phases[s.phase]
            if not phases:
                self._by_digest.pop(digest, None)
            _remove(self._vulnerabilities, digest, s.ref)
        if (tag := tag_of(s.image)) and tag in self._by_tag:
            self._by_tag[tag].discard(s.ref)
            if not self._by_tag[tag]:
                del self._by_tag[tag]
        rule = (s.namespace, s.owner or "")
        if rule in self._by_rule:
            self._by_rule[rule].discard(s.name)
            if not self._by_rule[rule]:
                del self._by_rule[rule]
        if s.result_key:
            _remove(self._results, s.result_key, s.ref)
        if s.summary is not None and s.namespace in self.totals:
            counts = self.totals[s.namespace]
            for i, n in enumerate(s.summary):
                counts[i] -= n
            if not any(counts):
                del self.totals[s.namespace]

    # -- reads ---------------------------------------------------------------------

    @property
    def running_jobs(self) -> int:
        return len(self._running)

    @property
    def queue_depth(self) -> int:
        return len(self._queued)

    def rescans_requested(self) -> list[ScanState]:
        """Settled scans asked to scan again (a push, or a rule whose tag moved); one in
        flight is asked when it settles."""
        return list(self._rescans.values())

    def by_digest(self, digest: str) -> list[ScanState]:
        """Every ImageScan of a digest (a manifest's, or an index's)."""
        return [self.scans[r] for refs in self._by_digest.get(digest, {}).values()
                for r in refs]

    def by_tag(self, image: str) -> list[ScanState]:
        """Every ImageScan of the tag `image` names (pinned to a digest or not)."""
        tag = tag_of(image)
        return [self.scans[r] for r in self._by_tag.get(tag, ())] if tag else []

    def in_phase(self, digest: str, phases: Iterable[str | None]) -> ScanState | None:
        """An ImageScan of the digest in one of `phases`, if there is one."""
        held = self._by_digest.get(digest, {})
        for phase in phases:
            for ref in held.get(phase, ()):
                return self.scans[ref]
        return None

    def newest_vulnerabilities(self, digest: str, scanners: Iterable[str] = ()
                               ) -> ScanState | None:
        """The newest completed vulnerability scan of a digest, a manifest's or the index's
        it was chosen from (what admission judges); with `scanners`, the newest of those
        whose result was made with all of them, if there is one (policies that judge
        secrets or configuration checks need such a result)."""
        held = self._vulnerabilities.get(digest, Newest())
        newest = held.newest()
        if newest is None:
            return None
        top = self.scans[newest[0]]
        wanted = frozenset(scanners)
        if wanted <= top.result_scanners:
            return top
        # A pass over the digest's results, only when the newest lacks a scanner asked for.
        best = max(((ref, when) for ref, when in held.times.items()
                    if wanted <= self.scans[ref].result_scanners),
                   key=lambda held_at: held_at[1], default=None)
        return self.scans[best[0]] if best is not None else top

    def by_rule(self, namespace: str, rule: str) -> list[ScanState]:
        """The ImageScans a ScanRule created and keeps."""
        return [self.scans[(namespace, n)] for n in self._by_rule.get((namespace, rule), ())]

    def fresh_result(self, key: str, now: datetime) -> ScanState | None:
        """The newest result of `key` made within the rescan interval, and not with a
        vulnerability DB older than the one known."""
        newest = self._results.get(key, Newest()).newest()
        if newest is None:
            return None
        ref, made = newest
        fresh = self.scans[ref]
        return fresh if now - made < self.rescan_interval and self.made_with_known_db(
            fresh) else None

    def made_with_known_db(self, s: ScanState) -> bool:
        """Whether a result may stand for its digest as far as its DB goes: made with the
        DB known (or either is unknown). One made with another DB, older or newer (the
        scanner's DB was rolled back), is not reused."""
        return self.known_db is None or s.db_updated_at is None or (
            s.db_updated_at == self.known_db) or "vuln" not in s.scanners

    def new_db(self, updated_at: datetime, now: datetime) -> bool:
        """The scanner serves a vulnerability DB made at `updated_at` (seen at `now`):
        whether it is another than the one known (a newer one, or one rolled back to).
        Results are held to it from now on (reuse, staleResults, results seen later);
        those held already are requeued by requeue_older, on the leader only."""
        if updated_at == self.known_db:
            return False
        self.known_db, self._known_since = updated_at, now
        return True

    def requeue_older(self, first: Iterable[str] = ()) -> int:
        """Requeue every completed result made with an older DB than the one known,
        through the queue (plan's Requeue, within its limits), those of the digests in
        `first` (what runs) ahead of the rest: how many. The leader's, once per DB: a
        replica that does not plan would only pile them up."""
        ahead = set(first)
        stale = [s for s in self.scans.values()
                 if s.phase == Phase.COMPLETED and s.scanned_at and s.made_before(self.known_db)]
        # Due at once, what runs first: the heap pops the earliest time first, so plan
        # requeues these in that order, and the queue starts them in the order requeued.
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        for s in stale:
            assert s.scanned_at is not None
            due = epoch if not ahead.isdisjoint(s.digests) else epoch + timedelta(seconds=1)
            heapq.heappush(self._expiry, (due, s.ref, s.scanned_at))
        return len(stale)

    def due_pending(self, now: datetime) -> list[ScanState]:
        """Pending scans whose digest is to be resolved now."""
        return [s for s in self._pending.values()
                if s.retry_after is None or s.retry_after <= now]

    def collectable(self) -> list[tuple[ScanState, JobState]]:
        """Scanning scans whose Job has finished, or whose Job's pod has succeeded."""
        found = []
        for s in self._scanning.values():
            job = self.jobs.get(s.job_name or "")
            if job is None or not job.scans(s):
                continue
            pod = self._succeeded.get(job.name)
            if job.finished:
                found.append((s, job))
            elif pod is not None and pod.job_uid == job.uid:
                found.append((s, replace(job, finished="Complete")))
        return found

    def orphaned(self, now: datetime, grace: timedelta) -> list[ScanState]:
        """Scanning scans whose Job is gone: deleted, or never seen within `grace` of the
        start (expired while the operator was down, or never created)."""
        found = []
        for s in self._scanning.values():
            job = self.jobs.get(s.job_name or "")
            # A Job of that name that is not this attempt's (a name taken) is no Job of it.
            if (s.job_name or "") in self._gone or ((job is None or not job.scans(s)) and (
                    s.start_time is None or now - s.start_time > grace)):
                found.append(s)
        return found

    def plan(self, now: datetime, limit: int) -> list[Action]:
        """Stale results to requeue; queued scans to answer from a fresh result of their
        key, or to start in queue order while running Jobs are under `limit`."""
        actions: list[Action] = list(self._stale(now))
        slots = max(0, limit - len(self._running))
        starting: set[str] = set()
        for s in sorted(self._queued.values(),
                        key=lambda s: (s.queued_at or now, s.namespace, s.name)):
            assert s.key is not None
            source = self.fresh_result(s.key, now)
            if source is not None:
                actions.append(Reuse(s, source))
            elif (s.key in self._in_flight or s.key in starting
                  or (s.retry_after is not None and s.retry_after > now)):
                continue
            elif slots > 0:
                actions.append(Start(s))
                starting.add(s.key)
                slots -= 1
        return actions

    def requeue_at(self, s: ScanState, when: datetime) -> None:
        """Have `plan` requeue this completed result at `when` (again, if an earlier
        requeue could not be written)."""
        assert s.scanned_at is not None
        heapq.heappush(self._expiry, (when, s.ref, s.scanned_at))

    def _stale(self, now: datetime) -> Iterator[Requeue]:
        while self._expiry and self._expiry[0][0] <= now:
            _, ref, scanned_at = heapq.heappop(self._expiry)
            s = self.scans.get(ref)
            if s is not None and s.phase == Phase.COMPLETED and s.scanned_at == scanned_at:
                yield Requeue(s)
