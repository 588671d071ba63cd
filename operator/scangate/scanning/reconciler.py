"""The ImageScan lifecycle: Pending -> Queued -> Scanning -> Completed | Failed.

The operator holds ImageScans, scan Jobs and their pods in the shared cache
(scangate.cache, its ScanIndex: scangate.core.scanstate), fed by kopf's watches, and
each pass acts only on what needs it: Pending
scans due for digest resolution, Scanning scans whose Job finished or vanished,
and the queue. Each piece of work runs as its own task with bounded concurrency,
so that one slow registry or one bad object never holds up the others. All state
lives in the objects, so a restarted operator picks up exactly where the last
one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from scangate import metrics
from scangate.api import GROUP, VERSION
from scangate.api.imagescan import Phase
from scangate.cache import Cache
from scangate.config import Settings
from scangate.core.destinations import Destinations
from scangate.core.durations import parse_duration
from scangate.core.framing import FrameError, FrameTooLarge
from scangate.core.images import ImageRef, InvalidReference, parse_image
from scangate.core.malware import SCAN_FAILED as MALWARE_SCAN_FAILED
from scangate.core.malware import MalwareError
from scangate.core.results import DB_KEY, log_tail, result_from_log
from scangate.core.rulestate import RuleState
from scangate.core.scanstate import (
    SCAN_UID_LABEL,
    JobState,
    Ref,
    Requeue,
    Reuse,
    ScanState,
    Start,
    project_job,
    stamp,
)
from scangate.core.trivy import BASELINE_FIELDS, SUPPRESSED_FIELDS, ReportError
from scangate.core.validation import check_image_on_registry
from scangate.kube import Kube, LogTooLarge, Obj, now
from scangate.registry.auth import CredentialsError
from scangate.registry.client import RegistryClient, RegistryError
from scangate.registry.configured import base_url, registry_client, shared_connections
from scangate.scanning.job import (
    ATTEMPT_ANNOTATION,
    MalwareSettings,
    ScanJobSpec,
    TrivySettings,
    build_job,
    credentials_secret,
    job_name,
)

log = logging.getLogger("scangate.scanning")
PLURAL = "imagescans"
RESULT_FIELDS = ("summary", "fixable", "findings", "findingsTruncated", "vulnerabilityIndex",
                 "vulnerabilityIndexTruncated", "os", "scanner", "scannedAt", "scannedWith",
                 *BASELINE_FIELDS, *SUPPRESSED_FIELDS, "malware")
MESSAGE_LIMIT = 4096  # status.message in the CRD
JOB_GRACE = timedelta(seconds=60)
"""How long a Scanning scan may wait for its Job to be seen before it counts as lost."""
MAX_BACKOFF = timedelta(minutes=5)
FORBIDDEN_PASSES = 10
"""Periodic passes a 403 on one scan's work is retried, without costing an attempt, before
it counts as an unexpected failure: the time a restarted API server's authorizer takes to
warm its RBAC caches."""


def _backoff(first: timedelta, attempt: int) -> timedelta:
    """`first` doubled per attempt, capped (2**attempt alone overflows a timedelta)."""
    delay: timedelta = min(first * 2 ** min(attempt, 20), MAX_BACKOFF)
    return delay


def _clip(message: str, limit: int = MESSAGE_LIMIT) -> str:
    return message if len(message) <= limit else message[:limit - 1] + "…"


def _owner(s: ScanState) -> Obj:
    """Enough of the ImageScan to hang an Event on."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageScan",
            "metadata": {"name": s.name, "namespace": s.namespace, "uid": s.uid}}


class ScanReconciler:
    def __init__(self, kube: Kube, settings: Settings, cache: Cache,
                 destinations: Destinations) -> None:
        self.kube, self.cache = kube, cache
        self.settings = settings
        self.trivy = TrivySettings(
            image=settings.trivy_image, mode=settings.trivy_mode,
            server_url=settings.trivy_server_url, db_repository=settings.trivy_db_repository,
            insecure_db_repository=settings.trivy_insecure_db_repository,
            run_as_user=settings.scan_run_as_user, token_secret=settings.trivy_token_secret,
            memory_limit=settings.scan_memory_limit)
        self.malware = MalwareSettings(
            image=settings.malware_image, db_url=settings.malware_db_url,
            db_files=tuple(settings.malware_db_files), db_claim=settings.malware_db_claim,
            db_max_age=settings.malware_db_max_age,
            max_layer_bytes=settings.malware_max_layer_bytes,
            allowed_networks=tuple(settings.allowed_networks),
            memory_limit=settings.malware_memory_limit)
        self.jobs_namespace = settings.namespace
        """Where scan Jobs run: the operator's namespace, never a tenant's."""
        self.retry_backoff = parse_duration(settings.retry_backoff)
        self.index = cache.scans
        self.destinations = destinations
        self._connections = shared_connections(settings, destinations)
        self._wake = asyncio.Event()
        self.active: Callable[[], bool] = lambda: True
        """Whether this replica leads (scangate.leader)."""
        self.vex_documents: Callable[[], tuple[str, ...]] = lambda: ()
        """The OpenVEX documents (configmap/key) scan Jobs apply (scangate.vexdocs)."""
        self._results: dict[tuple[str, str, int], Obj] = {}
        self._busy: set[Ref] = set()
        self._forbidden: dict[Ref, int] = {}
        self._deleting: set[str] = set()
        """Orphaned Jobs being deleted."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._registry_slots = asyncio.Semaphore(settings.registry_concurrency)
        self._api_slots = asyncio.Semaphore(settings.api_concurrency)
        for store in (cache.imagescans, cache.scan_jobs, cache.scan_pods):
            store.subscribe(self._changed)
        metrics.watch_index(self.index, per_image=settings.per_image_metrics)

    def _changed(self, _: object, gone: bool) -> None:
        """What the reconciler acts on changed (the cache says only when it did)."""
        self._wake.set()

    # -- the loop ------------------------------------------------------------------

    async def run(self) -> None:
        try:
            # Acting on half a picture could start a second scan of a digest whose first
            # is not listed yet, or exceed the running-Job limit.
            await asyncio.gather(*(store.synced.wait() for store in (
                self.cache.imagescans, self.cache.scan_jobs, self.cache.scan_pods)))
            log.info("scan state loaded", extra={"imagescans": len(self.index.scans),
                                                 "jobs": len(self.index.jobs)})
            # What is loaded now lives as long as the process: keep it out of the garbage
            # collector's full passes, which otherwise walk every projection held and
            # stall the event loop (and every admission review waiting on it) each time.
            gc.collect()
            gc.freeze()
            while True:
                self._wake.clear()
                try:
                    self.reconcile()
                except Exception:
                    log.exception("scan reconciliation pass failed; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.reconcile_interval)
        finally:
            for task in self._tasks:
                task.cancel()

    def reconcile(self) -> None:
        """One pass: start a task for each piece of work that is due and not under way.
        Only the leader acts: the other replicas keep the state, ready to take over."""
        if not self.active():
            return
        current = datetime.now(UTC)
        for name in self.index.orphan_jobs(current, JOB_GRACE):
            self._delete_orphan(name)
        for scan, job in self.index.collectable():
            self._spawn(scan, partial(self._collect, scan, job))
        for scan in self.index.orphaned(current, JOB_GRACE):
            self._spawn(scan, partial(self._attempt_failed, scan, "JobLost",
                                      f"scan Job {scan.job_name} is gone"))
        for scan in self.index.rescans_requested():
            self._spawn(scan, partial(self.rescan, scan,
                                      f"rescan requested: {scan.rescan_request}"))
        for scan in self.index.due_pending(current):
            # Lookups wait for registry slots only: a slow registry must not hold up the
            # collection of finished scans.
            self._spawn(scan, partial(self._resolve, scan), self._registry_slots)
        for action in self.index.plan(current, self.settings.max_running_scans):
            if action.scan.ref in self._busy:
                continue
            if isinstance(action, Start):
                self._spawn(action.scan, self._claim(action.scan, current))
            elif isinstance(action, Reuse):
                self._spawn(action.scan, partial(self._reuse, action.scan, action.source))
            elif isinstance(action, Requeue):
                self._spawn(action.scan, partial(self._requeue, action.scan))
        metrics.RUNNING_JOBS.set(self.index.running_jobs)
        metrics.QUEUE_DEPTH.set(self.index.queue_depth)

    def _delete_orphan(self, name: str) -> None:
        """Delete a Job whose ImageScan is gone (its pods and credentials go with it); a
        failure is tried again at a later pass."""
        if name in self._deleting:
            return
        self._deleting.add(name)

        async def delete() -> None:
            try:
                async with self._api_slots:
                    await self.kube.delete_job(self.jobs_namespace, name)
                log.info("deleted scan Job %s: its ImageScan is gone", name)
            except Exception as e:
                log.warning("could not delete the orphaned scan Job %s: %s", name, e)
            finally:
                self._deleting.discard(name)

        task = asyncio.create_task(delete())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn(self, scan: ScanState, work: Callable[[], Awaitable[None]],
               slots: asyncio.Semaphore | None = None) -> None:
        if scan.ref in self._busy:
            return
        self._busy.add(scan.ref)

        async def guarded() -> None:
            wake = True
            try:
                async with slots or self._api_slots:
                    await work()
                self._forbidden.pop(scan.ref, None)
            except Exception as e:
                status = e.status if isinstance(e, ApiException) else 0
                if status == 404:  # deleted meanwhile: its DELETED event follows
                    self._forbidden.pop(scan.ref, None)
                    self.index.delete_scan(scan.ref)
                    return
                forbidden = self._forbidden.get(scan.ref, 0)
                if status == 403 and forbidden < FORBIDDEN_PASSES:
                    # A restarted API server answers before its RBAC caches are warm; a
                    # 403 that lasts is this scan's failure, below (and bounded).
                    self._forbidden[scan.ref] = forbidden + 1
                    log.warning("API forbade a request for ImageScan %s/%s (%d of %d); "
                                "retrying", *scan.ref, forbidden + 1, FORBIDDEN_PASSES)
                    wake = False
                    return
                self._forbidden.pop(scan.ref, None)
                # No answer at all (the API server down or restarting) is unavailable
                # too: urllib3 gives up with its own errors, not an ApiException.
                if (status is None or status == 429 or status >= 500
                        or isinstance(e, HTTPError)):
                    log.warning("API unavailable for ImageScan %s/%s (%s); retrying",
                                *scan.ref, status or type(e).__name__)
                    # At the next periodic pass, not at once: every pass would fail
                    # again, in a loop as fast as the API server refuses connections.
                    wake = False
                    return
                # One object's surprise must not stop the others: it costs this scan an
                # attempt, and the attempts are bounded.
                log.exception("unexpected error on ImageScan %s/%s", *scan.ref)
                held = self.index.scans.get(scan.ref, scan)
                retry = (self._resolve_failed if held.phase in (None, Phase.PENDING)
                         else self._attempt_failed)
                with contextlib.suppress(Exception):
                    await retry(held, "InternalError", f"{type(e).__name__}: {e}")
            finally:
                self._busy.discard(scan.ref)
                if wake:
                    self._wake.set()

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- status ----------------------------------------------------------------------

    async def _set(self, scan: ScanState, status: Obj, ready: bool, reason: str,
                   message: str) -> None:
        """Patch the status with its Ready condition and hold what the server returns."""
        if status.get("message"):
            status["message"] = _clip(status["message"])
        status["observedGeneration"] = scan.generation
        ready_status = "True" if ready else "False"
        # kstatus: the time moves only when the condition's status does.
        since = scan.ready[1] if scan.ready and scan.ready[0] == ready_status else now()
        status["conditions"] = [{
            "type": "Ready", "status": ready_status, "reason": reason,
            "message": _clip(message, 32768), "lastTransitionTime": since,
            "observedGeneration": scan.generation}]
        try:
            obj = await self.kube.patch_status(PLURAL, scan.namespace, scan.name, status)
        except ApiException as e:
            if e.status != 422 or status.get("phase") == Phase.FAILED:
                raise
            # The API server refused what we meant to store (it broke the schema): keep
            # the scan from retrying the same write forever.
            return await self._fail(scan, "InvalidResult",
                                    f"the API server refused the result: {e.reason}")
        self.cache.imagescans.apply(obj)

    # -- Pending: resolve the digest -----------------------------------------------

    async def _resolve(self, scan: ScanState) -> None:
        platform = scan.platform or "linux/amd64"
        try:
            ref = parse_image(scan.image)
            client = await self._registry(scan, ref)
            async with client:
                resolved = await client.resolve(ref, platform)
        except (InvalidReference, CredentialsError, ssl.SSLError) as e:
            return await self._fail(scan, "InvalidSpec", str(e))
        except RegistryError as e:
            metrics.REGISTRY_REQUESTS.labels(self._registry_label(scan), e.reason).inc()
            if not e.transient:
                return await self._fail(scan, e.reason, str(e))
            return await self._resolve_failed(scan, e.reason, str(e))
        metrics.REGISTRY_REQUESTS.labels(self._registry_label(scan), "ok").inc()
        await self._set(scan, {
            "phase": Phase.QUEUED, "digest": resolved.digest, "indexDigest": resolved.index_digest,
            "platform": platform,
            "queuedAt": now(), "attempts": 0, "reason": None, "message": None,
            "retryAfter": None, **self._answered(scan)}, False, Phase.QUEUED,
            f"waiting to scan {resolved.digest}")

    async def _rule_registry(self, scan: ScanState
                             ) -> tuple[RuleState | None, Obj, Obj | None]:
        """The scan's ScanRule (if any, from the cache), its registry spec, and its
        credentials Secret (read when needed: Secrets are not cached)."""
        rule = self.cache.scanrules.items.get((scan.namespace, scan.rule)) if scan.rule else None
        registry: Obj = rule.registry if rule is not None else {}
        secret_ref = registry.get("credentialsSecretRef")
        if not secret_ref:
            return rule, registry, None
        secret = await self.kube.get_secret(scan.namespace, secret_ref["name"])
        if secret is None:
            raise CredentialsError(f"credentials Secret {secret_ref['name']} not found")
        return rule, registry, secret

    async def _resolve_failed(self, scan: ScanState, reason: str, message: str) -> None:
        """Try the lookup again after a backoff, a bounded number of times."""
        metrics.SCAN_FAILURES.labels(reason).inc()
        if scan.attempts + 1 >= self.settings.max_resolve_attempts:
            return await self._fail(scan, reason, f"{message} (after {scan.attempts + 1} "
                                                  "attempts)")
        delay = _backoff(self.retry_backoff, scan.attempts)
        text = f"{message}; retrying in {int(delay.total_seconds())}s"
        await self._set(scan, {
            "phase": Phase.PENDING, "reason": reason, "message": text,
            "attempts": scan.attempts + 1,
            "retryAfter": stamp(datetime.now(UTC) + delay)}, False, reason, text)
        await self.kube.event(_owner(scan), "Warning", reason, text)

    def _registry_label(self, scan: ScanState) -> str:
        """A registry as a metric label: only configured registries, never what a user
        typed (which would make the series unbounded)."""
        with contextlib.suppress(InvalidReference):
            host = parse_image(scan.image).registry
            if host in self.settings.insecure_registries or host == "docker.io":
                return host
        return "rule" if scan.rule else "other"

    @staticmethod
    def _on_rule_registry(scan: ScanState, registry: Obj) -> bool:
        """The check the ImageScan webhook makes at apply, made again where it matters."""
        return not check_image_on_registry(scan.image, str(registry.get("url", "")),
                                           scan.rule or "")

    async def _registry(self, scan: ScanState, ref: ImageRef) -> RegistryClient:
        rule, registry, secret = await self._rule_registry(scan)
        if rule is not None and not self._on_rule_registry(scan, registry):
            # A rule's credentials and TLS settings are for its own registry only: an
            # ImageScan naming another host must never hand them over.
            raise CredentialsError(str(check_image_on_registry(
                scan.image, str(registry.get("url", "")), scan.rule or "")[0]))
        rule_url = str(registry.get("url", "")) if rule is not None else None
        return registry_client(base_url(ref, rule_url, self.settings), registry, secret,
                               ref.registry, self.settings, self.destinations,
                               self._connections)

    # -- Queued: start, reuse, or requeue a stale result ------------------------------

    def _claim(self, scan: ScanState, current: datetime) -> Callable[[], Awaitable[None]]:
        """Count the Job against the limit and its digest as in flight *now*, before it
        exists, so that the next pass neither exceeds the limit nor scans it twice."""
        attempt = scan.attempts + 1
        assert scan.key is not None  # Queued: its digest is known
        name = job_name(scan.namespace, scan.name, scan.uid, stamp(scan.queued_at or current),
                        attempt, scan.key)
        placeholder = JobState(name, scan=scan.ref, scan_uid=scan.uid)
        self.index.expect_job(placeholder)
        self.index.upsert_scan(replace(scan, phase=Phase.SCANNING, job_name=name, job_uid=None,
                                       start_time=current, attempts=attempt), claim=True)

        async def start() -> None:
            try:
                await self._start(scan, name, attempt)
            except BaseException:
                if self.index.jobs.get(name) == placeholder:
                    self.index.delete_job(name)
                held = self.index.scans.get(scan.ref)
                if held is not None and held.version == scan.version:
                    self.index.upsert_scan(replace(scan, version=-1), claim=True)
                raise

        return start

    async def _start(self, scan: ScanState, name: str, attempt: int) -> None:
        assert scan.digest is not None
        ref = parse_image(scan.image).with_digest(scan.digest)
        rule, registry, secret = await self._rule_registry(scan)
        try:
            timeout = parse_duration(scan.timeout or self.settings.scan_timeout)
        except ValueError as e:  # stored behind the webhook's back: scanning cannot help
            return await self._fail(scan, "InvalidSpec", f"spec.timeout: {e}")
        on_rule_registry = rule is not None and self._on_rule_registry(scan, registry)
        # The rule's TLS settings and credentials are for its own registry only.
        credentials = secret if secret is not None and on_rule_registry else None
        job_spec = ScanJobSpec(
            scan_name=scan.name, scan_namespace=scan.namespace, scan_uid=scan.uid,
            image=f"{ref.name}@{ref.digest}", queued_at=stamp(scan.queued_at or datetime.now(UTC)),
            attempt=attempt, timeout_seconds=int(timeout.total_seconds()),
            scanners=scan.scanners, ignore_unfixed=scan.ignore_unfixed,
            platform=scan.platform or "linux/amd64",
            insecure_registry=base_url(ref, registry.get("url") if rule is not None else None,
                                       self.settings).startswith("http://") or (
                on_rule_registry and bool(registry.get("insecureSkipTLSVerify"))),
            ca_bundle=registry.get("caBundle") if on_rule_registry else None,
            credentials_type=str(credentials.get("type")) if credentials else None,
            vex=self.vex_documents(),
            registry_url=base_url(ref, registry.get("url") if rule is not None else None,
                                  self.settings),
            insecure_skip_verify=on_rule_registry and bool(
                registry.get("insecureSkipTLSVerify")))
        body = build_job(job_spec, self.trivy, self.jobs_namespace, self.malware)
        assert body["metadata"]["name"] == name
        job = await self.kube.create_job(self.jobs_namespace, body)
        created = job is not None
        if job is None:
            job = await self._earlier_job(scan, name, attempt)
            if job is None:
                return await self._attempt_failed(
                    scan, "JobNameTaken", f"a Job named {name} that scangate did not create "
                    f"for this scan exists in namespace {self.jobs_namespace}")
        if credentials is not None and (job.get("spec") or {}).get("suspend"):
            # The copy is owned by the Job: deleting the Job (or its TTL) deletes it.
            await self.kube.create_secret(self.jobs_namespace, credentials_secret(job, credentials))
            await self.kube.resume_job(self.jobs_namespace, name)
        self.index.upsert_job(project_job(job))  # its uid, before the watch tells it
        await self._set(scan, {
            "phase": Phase.SCANNING, "jobName": name, "jobUID": job["metadata"]["uid"],
            "attempts": attempt, "startTime": now(), "retryAfter": None}, False, Phase.SCANNING,
            f"scan Job {self.jobs_namespace}/{name} running")
        if created:
            await self.kube.event(_owner(scan), "Normal", "ScanStarted",
                                  f"scanning {ref.name}@{ref.digest} in Job "
                                  f"{self.jobs_namespace}/{name} (attempt {attempt})")

    async def _earlier_job(self, scan: ScanState, name: str, attempt: int) -> Obj | None:
        """The Job of this name, if an earlier leader created it for this very attempt (and
        died before recording it); None if the name is someone else's."""
        job = await self.kube.get_job(self.jobs_namespace, name)
        meta = (job or {}).get("metadata") or {}
        if ((meta.get("labels") or {}).get(SCAN_UID_LABEL) == scan.uid
                and (meta.get("annotations") or {}).get(ATTEMPT_ANNOTATION) == str(attempt)):
            return job
        return None

    async def _result_of(self, source: ScanState) -> Obj | None:
        """The stored result of `source`, read once per version of it: a thousand scans of
        one digest reuse one result."""
        key = (source.namespace, source.name, source.version)
        if key not in self._results:
            obj = await self.kube.get_custom(PLURAL, source.namespace, source.name)
            src = (obj or {}).get("status") or {}
            if src.get("phase") != Phase.COMPLETED or src.get("summary") is None:
                return None  # changed under us; the next pass decides again
            self._results[key] = {k: src.get(k) for k in RESULT_FIELDS}
            while len(self._results) > 32:
                self._results.pop(next(iter(self._results)))
        return self._results[key]

    async def _reuse(self, scan: ScanState, source: ScanState) -> None:
        src = await self._result_of(source)
        if src is None:
            return
        origin = f"{source.namespace}/{source.name}"
        await self._set(scan, {
            **src, "phase": Phase.COMPLETED,
            "reusedFrom": origin, "completionTime": now(), "reason": None, "message": None},
            True, "Reused", f"fresh result of the same digest in {origin}")
        metrics.SCANS.labels("reused").inc()
        await self.kube.event(_owner(scan), "Normal", "ResultReused",
                              f"reused the result of {origin} for digest {source.digest}")

    async def rescan(self, scan: ScanState, message: str) -> None:
        """Resolve the tag again and scan: the result is stale, or a rescan was asked for
        (the tag was pushed or moved, or a user asked). The result held stays until a new
        one replaces it."""
        await self._set(scan, {"phase": Phase.PENDING, "attempts": 0, "retryAfter": None,
                               "reason": None, "message": None, **self._answered(scan)},
                        True, "Rescanning", message)

    @staticmethod
    def _answered(scan: ScanState) -> Obj:
        """A lookup of the tag answers every rescan asked for so far."""
        return ({"rescanAnswered": scan.rescan_request} if scan.rescan_request is not None
                else {})

    async def _requeue(self, scan: ScanState) -> None:
        """A stale result: resolve the tag again (it may have moved) and scan."""
        try:
            await self.rescan(scan, "result older than the rescan interval")
        except Exception:
            self.index.requeue_at(scan, datetime.now(UTC) + self.retry_backoff)
            raise

    # -- Scanning: collect the Job -----------------------------------------------------

    async def _collect(self, scan: ScanState, job: JobState) -> None:
        if job.deadline_exceeded:
            # The Job controller deletes the pod at the deadline: there may be no log.
            return await self._attempt_failed(scan, "ScanTimeout",
                                              f"scan Job {job.name} exceeded its deadline")
        try:
            text = await self.kube.job_pod_log(self.jobs_namespace, job.name, job.uid, "trivy",
                                               self.settings.max_result_log_bytes)
        except LookupError as e:
            return await self._attempt_failed(scan, "PodLost", str(e))
        except ApiException as e:
            # A container that never started has no log (400): the malware step, an init
            # container, ended the pod before Trivy (killed, or crashed).
            if e.status not in (400, 404) or job.finished != "Failed" or (
                    "malware" not in scan.scanners):
                raise
            text = ""
        except LogTooLarge as e:
            return await self._fail(scan, "ResultTooLarge", f"{e} (MAX_RESULT_LOG_BYTES)",
                                    counted=False)
        if job.finished == "Failed" and self.index.oom_killed(job.name, job.uid):
            # The same image under the same limit would be killed again: no retry.
            return await self._fail(scan, "OOMKilled", (
                f"scan pod of Job {job.name} was killed at its memory limit "
                f"({self.trivy.memory_limit}); raise config.scanMemoryLimit"
                + (f" (or config.malwareMemoryLimit, {self.malware.memory_limit}, for its "
                   f"malware step)" if "malware" in scan.scanners else "")))
        if job.finished == "Failed" and not text and "malware" in scan.scanners:
            return await self._attempt_failed(scan, MALWARE_SCAN_FAILED, (
                f"the malware step of Job {job.name} failed before Trivy started (see the "
                f"scan pod's malware container)"))
        if job.finished == "Failed":
            tail = log_tail(text) or "no output"
            return await self._attempt_failed(scan, "TrivyFailed", f"Trivy failed: {tail}")
        try:
            # Off the event loop: a large report takes a while to decompress and parse.
            result = await asyncio.to_thread(result_from_log, text,
                                             self.settings.findings_budget_bytes,
                                             self.settings.max_result_bytes, scan.scanners)
        except FrameTooLarge as e:
            # Intact but too large (a decompression bomb, or a report past
            # MAX_RESULT_BYTES): another attempt would print the same.
            return await self._fail(scan, "ResultTooLarge", f"{e} (MAX_RESULT_BYTES)",
                                    counted=False)
        except FrameError as e:
            return await self._attempt_failed(scan, "ResultCorrupted", str(e))
        except ReportError as e:
            # The frame was intact, so this is what Trivy printed: trying again would
            # print it again.
            return await self._fail(scan, "InvalidReport", str(e))
        except MalwareError as e:
            # The malware step could not look (no or stale signatures, a limit, a timeout):
            # never a clean result. A mirror may be back for the next attempt.
            return await self._attempt_failed(scan, e.reason, str(e))
        del text
        malware_db = result.pop("malwareDB", None)
        vulnerability_db = result.pop(DB_KEY, {})
        finished = datetime.now(UTC)
        done_at = stamp(finished)
        summary = result["summary"]
        await self._set(scan, {
            **result, "phase": Phase.COMPLETED, "completionTime": done_at, "scannedAt": done_at,
            "scannedWith": {"scanners": list(scan.scanners),
                            "ignoreUnfixed": scan.ignore_unfixed,
                            **({"malwareDB": malware_db} if malware_db else {}),
                            **vulnerability_db},
            "reason": None, "message": None, "reusedFrom": None}, True, Phase.COMPLETED,
            "scan completed")
        metrics.SCANS.labels("completed").inc()
        if scan.start_time:
            metrics.SCAN_DURATION.observe((finished - scan.start_time).total_seconds())
        counts = ", ".join(f"{summary[s]} {s}" for s in ("critical", "high", "medium", "low"))
        baseline = f"; {result['baseline']}" if result.get("baseline") else ""
        if result.get("malware") is not None:
            baseline += f"; malware: {result['malware']['count']} detections"
        await self.kube.event(_owner(scan), "Normal", "ScanCompleted",
                              f"{counts} ({summary['total']} findings in all){baseline}")

    async def _attempt_failed(self, scan: ScanState, reason: str, message: str) -> None:
        # A scan that failed before its Job started has not counted the attempt yet.
        attempts = scan.attempts if scan.phase == Phase.SCANNING else scan.attempts + 1
        attempts = max(attempts, 1)
        metrics.SCAN_FAILURES.labels(reason).inc()
        if attempts < self.settings.max_scan_attempts:
            delay = _backoff(self.retry_backoff, attempts - 1)
            text = _clip(f"attempt {attempts} of {self.settings.max_scan_attempts} failed: "
                         f"{message}; retrying in {int(delay.total_seconds())}s")
            await self._set(scan, {
                "phase": Phase.QUEUED, "reason": reason, "message": text, "attempts": attempts,
                "retryAfter": stamp(datetime.now(UTC) + delay)}, False, reason, text)
            metrics.SCANS.labels("retried").inc()
            await self.kube.event(_owner(scan), "Warning", reason, text)
            return
        await self._fail(scan, reason, f"{message} (after {attempts} attempts)")

    async def _fail(self, scan: ScanState, reason: str, message: str,
                    counted: bool = True) -> None:
        """`counted`: the attempt's failure is already in scangate_scan_failures_total."""
        if not counted:
            metrics.SCAN_FAILURES.labels(reason).inc()
        message = _clip(message)
        await self._set(scan, {
            "phase": Phase.FAILED, "reason": reason, "message": message, "completionTime": now(),
            "retryAfter": None}, False, reason, message)
        metrics.SCANS.labels("failed").inc()
        await self.kube.event(_owner(scan), "Warning", "ScanFailed", message)
