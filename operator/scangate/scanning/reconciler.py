"""The ImageScan lifecycle, level-triggered: Pending -> Queued -> Scanning -> Completed | Failed.

Every pass reads the ImageScans and scan Jobs from the API and moves each scan
one step: resolve a Pending scan's digest, start queued scans as Job slots free
up (or answer them from a fresh result of the same digest), and collect finished
Jobs. Because all state lives in the objects, a restarted operator picks up
exactly where the last one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from scangate import metrics
from scangate.config import Settings
from scangate.core.durations import parse_duration
from scangate.core.framing import FrameError
from scangate.core.images import ImageRef, InvalidReference, parse_image
from scangate.core.queue import Requeue, Reuse, ScanView, Start, plan, scan_key
from scangate.core.results import log_tail, result_from_log
from scangate.core.trivy import ReportError
from scangate.kube import Kube, Obj, now, stamp
from scangate.registry.auth import CredentialsError, credentials_from_secret
from scangate.registry.client import (
    Credentials,
    RegistryClient,
    RegistryError,
)
from scangate.scanning.job import SCAN_LABEL, ScanJobSpec, TrivySettings, build_job

log = logging.getLogger("scangate.scanning")
PLURAL = "imagescans"
RESULT_FIELDS = ("summary", "fixable", "findings", "findingsTruncated", "os", "scanner",
                 "scannedAt")


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _condition(ready: bool, reason: str, message: str, generation: int | None) -> list[Obj]:
    return [{"type": "Ready", "status": "True" if ready else "False", "reason": reason,
             "message": message[:32768], "lastTransitionTime": now(),
             "observedGeneration": generation}]


def _finished(job: Obj) -> str | None:
    """'Complete' or 'Failed' once a Job has finished."""
    for c in job.get("status", {}).get("conditions") or []:
        if c["type"] in ("Complete", "Failed") and c["status"] == "True":
            return str(c["type"])
    return None


class ScanReconciler:
    def __init__(self, kube: Kube, settings: Settings) -> None:
        self.kube = kube
        self.settings = settings
        self.trivy = TrivySettings(
            image=settings.trivy_image, mode=settings.trivy_mode,
            server_url=settings.trivy_server_url, db_repository=settings.trivy_db_repository,
            insecure_db_repository=settings.trivy_insecure_db_repository,
            run_as_user=settings.scan_run_as_user)
        self.rescan_interval = parse_duration(settings.rescan_interval)
        self.retry_backoff = parse_duration(settings.retry_backoff)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("scan reconciliation failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.reconcile_interval)

    # -- one pass ------------------------------------------------------------------

    async def reconcile(self) -> None:
        scans = await self.kube.list_custom(PLURAL)
        jobs = await self.kube.list_jobs(SCAN_LABEL)
        by_ref = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in scans}
        running = 0
        for job in jobs:
            state = _finished(job)
            if state is None:
                running += 1
                continue
            scan = by_ref.get((job["metadata"]["namespace"],
                               job["metadata"]["labels"].get(SCAN_LABEL, "")))
            status = (scan or {}).get("status") or {}
            if scan and status.get("phase") == "Scanning" and \
                    status.get("jobName") == job["metadata"]["name"]:
                await self._collect(scan, job, state)

        current = datetime.now(UTC)
        for scan in scans:
            status = scan.get("status") or {}
            retry_after = _time(status.get("retryAfter"))
            if status.get("phase") in (None, "Pending") and (
                retry_after is None or retry_after <= current
            ):
                await self._resolve(scan)

        views = [self._view(s) for s in scans]
        for action in plan(views, running, self.settings.max_running_scans, current,
                           self.rescan_interval):
            scan = by_ref[(action.scan.namespace, action.scan.name)]
            if isinstance(action, Start):
                running += await self._start(scan)
            elif isinstance(action, Reuse):
                await self._reuse(scan, by_ref[(action.source.namespace, action.source.name)])
            elif isinstance(action, Requeue):
                await self._set(scan, {"phase": "Queued", "queuedAt": now(), "attempts": 0,
                                       "retryAfter": None})
        metrics.RUNNING_JOBS.set(running)
        metrics.QUEUE_DEPTH.set(sum(1 for s in scans
                                    if (s.get("status") or {}).get("phase") == "Queued"))

    def _view(self, scan: Obj) -> ScanView:
        status = scan.get("status") or {}
        digest = status.get("digest")
        scanners, ignore_unfixed = self._options(scan)
        return ScanView(
            namespace=scan["metadata"]["namespace"], name=scan["metadata"]["name"],
            phase=status.get("phase"),
            key=scan_key(digest, scanners, ignore_unfixed) if digest else None,
            queued_at=_time(status.get("queuedAt")) or _time(scan["metadata"].get(
                "creationTimestamp")),
            scanned_at=_time(status.get("scannedAt")),
            retry_after=_time(status.get("retryAfter")),
            has_result=status.get("summary") is not None,
        )

    def _options(self, scan: Obj) -> tuple[list[str], bool]:
        spec = scan["spec"]
        return list(spec.get("scanners") or ["vuln"]), bool(spec.get("ignoreUnfixed"))

    async def _set(self, scan: Obj, status: Obj) -> None:
        """Patch the scan's status and keep the local copy in step for this pass."""
        meta = scan["metadata"]
        await self.kube.patch_status(PLURAL, meta["namespace"], meta["name"], status)
        merged = {**(scan.get("status") or {}), **status}
        scan["status"] = {k: v for k, v in merged.items() if v is not None}

    # -- Pending: resolve the digest -----------------------------------------------

    async def _resolve(self, scan: Obj) -> None:
        spec, meta = scan["spec"], scan["metadata"]
        platform = spec.get("platform") or "linux/amd64"
        try:
            ref = parse_image(spec["image"])
            client = await self._registry(scan, ref)
            async with client:
                resolved = await client.resolve(ref, platform)
        except (InvalidReference, CredentialsError) as e:
            return await self._fail(scan, "InvalidSpec", str(e))
        except RegistryError as e:
            metrics.REGISTRY_REQUESTS.labels(ref.registry, e.reason).inc()
            if not e.transient:
                return await self._fail(scan, e.reason, str(e))
            attempts = int((scan.get("status") or {}).get("attempts") or 0)
            delay = min(self.retry_backoff * 2 ** attempts, timedelta(minutes=5))
            message = f"{e}; retrying in {int(delay.total_seconds())}s"
            await self._set(scan, {
                "phase": "Pending", "reason": e.reason, "message": message,
                "attempts": attempts + 1,
                "retryAfter": stamp(datetime.now(UTC) + delay),
                "conditions": _condition(False, e.reason, message, meta.get("generation"))})
            metrics.SCAN_FAILURES.labels(e.reason).inc()
            await self.kube.event(scan, "Warning", e.reason, message)
            return
        metrics.REGISTRY_REQUESTS.labels(ref.registry, "ok").inc()
        await self._set(scan, {
            "phase": "Queued", "digest": resolved.digest, "platform": platform,
            "queuedAt": now(), "attempts": 0, "reason": None, "message": None,
            "retryAfter": None, "observedGeneration": meta.get("generation"),
            "conditions": _condition(False, "Queued", f"waiting to scan {resolved.digest}",
                                     meta.get("generation"))})

    async def _rule_registry(self, scan: Obj) -> tuple[Obj | None, Obj, str | None, Obj | None]:
        """The scan's ScanRule (if any), its registry spec, and the credentials Secret's name
        and object (None when the Secret is missing)."""
        rule_ref = scan["spec"].get("ruleRef")
        rule = (await self.kube.get_custom("scanrules", scan["metadata"]["namespace"],
                                           rule_ref["name"]) if rule_ref else None)
        registry: Obj = (rule or {}).get("spec", {}).get("registry", {})
        secret_ref = registry.get("credentialsSecretRef")
        if not secret_ref:
            return rule, registry, None, None
        secret = await self.kube.get_secret(scan["metadata"]["namespace"], secret_ref["name"])
        return rule, registry, secret_ref["name"], secret

    def _base_url(self, ref: ImageRef, rule: Obj | None) -> str:
        if rule:
            url = str(rule["spec"]["registry"]["url"]).rstrip("/")
            if urlsplit(url).netloc == ref.registry:
                return url
        if ref.registry == "docker.io":
            return "https://registry-1.docker.io"
        insecure = ref.registry in self.settings.insecure_registries
        return f"{'http' if insecure else 'https'}://{ref.registry}"

    async def _registry(self, scan: Obj, ref: ImageRef) -> RegistryClient:
        rule, registry, secret_name, secret = await self._rule_registry(scan)
        credentials: Credentials | None = None
        if secret_name:
            if secret is None:
                raise CredentialsError(f"credentials Secret {secret_name} not found")
            credentials = credentials_from_secret(secret, ref.registry)
        verify: ssl.SSLContext | bool = True
        if registry.get("insecureSkipTLSVerify"):
            verify = False
        elif registry.get("caBundle"):
            verify = ssl.create_default_context(cadata=registry["caBundle"])
        return RegistryClient(self._base_url(ref, rule), credentials=credentials, verify=verify,
                              timeout=parse_duration(self.settings.registry_timeout)
                              .total_seconds())

    # -- Queued: start, or reuse -----------------------------------------------------

    async def _start(self, scan: Obj) -> int:
        spec, meta, status = scan["spec"], scan["metadata"], scan.get("status") or {}
        ref = parse_image(spec["image"]).with_digest(status["digest"])
        attempt = int(status.get("attempts") or 0) + 1
        rule, _, _, secret = await self._rule_registry(scan)
        scanners, ignore_unfixed = self._options(scan)
        timeout = parse_duration(spec.get("timeout") or self.settings.scan_timeout)
        job_spec = ScanJobSpec(
            scan_name=meta["name"], namespace=meta["namespace"], scan_uid=meta["uid"],
            image=f"{ref.name}@{ref.digest}", queued_at=str(status.get("queuedAt")),
            attempt=attempt,
            timeout_seconds=int(timeout.total_seconds()), scanners=tuple(scanners),
            ignore_unfixed=ignore_unfixed, platform=status.get("platform") or "linux/amd64",
            insecure_registry=self._base_url(ref, rule).startswith("http://"),
            credentials_secret=secret["metadata"]["name"] if secret else None,
            credentials_type=secret.get("type") if secret else None)
        job = build_job(job_spec, self.trivy)
        created = await self.kube.create_job(meta["namespace"], job)
        name = job["metadata"]["name"]
        await self._set(scan, {
            "phase": "Scanning", "jobName": name, "attempts": attempt, "startTime": now(),
            "retryAfter": None,
            "conditions": _condition(False, "Scanning", f"scan Job {name} running",
                                     meta.get("generation"))})
        if created:
            await self.kube.event(scan, "Normal", "ScanStarted",
                                  f"scanning {ref.name}@{ref.digest} in Job {name} "
                                  f"(attempt {attempt})")
        return 1

    async def _reuse(self, scan: Obj, source: Obj) -> None:
        src = source.get("status") or {}
        ref = f"{source['metadata']['namespace']}/{source['metadata']['name']}"
        await self._set(scan, {
            **{k: src.get(k) for k in RESULT_FIELDS}, "phase": "Completed", "reusedFrom": ref,
            "completionTime": now(), "reason": None, "message": None,
            "conditions": _condition(True, "Reused", f"fresh result of the same digest in {ref}",
                                     scan["metadata"].get("generation"))})
        metrics.SCANS.labels("reused").inc()
        await self.kube.event(scan, "Normal", "ResultReused",
                              f"reused the result of {ref} for digest {src.get('digest')}")

    # -- Scanning: collect the Job -----------------------------------------------------

    async def _collect(self, scan: Obj, job: Obj, state: str) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        try:
            text = await self.kube.job_pod_log(ns, name, "trivy")
        except LookupError as e:
            return await self._attempt_failed(scan, "PodLost", str(e))
        if state == "Failed":
            reasons = [c.get("reason") for c in job["status"].get("conditions") or []
                       if c["type"] == "Failed"]
            reason = "ScanTimeout" if "DeadlineExceeded" in reasons else "TrivyFailed"
            tail = log_tail(text) or "no output"
            return await self._attempt_failed(scan, reason, f"Trivy failed: {tail}")
        try:
            result = result_from_log(text, self.settings.findings_budget_bytes)
        except (FrameError, ReportError) as e:
            return await self._attempt_failed(scan, "ResultCorrupted", str(e))
        started = _time((scan.get("status") or {}).get("startTime"))
        finished = datetime.now(UTC)
        done_at = stamp(finished)
        summary = result["summary"]
        await self._set(scan, {
            **result, "phase": "Completed", "completionTime": done_at, "scannedAt": done_at,
            "reason": None, "message": None, "reusedFrom": None,
            "conditions": _condition(True, "Completed", "scan completed",
                                     scan["metadata"].get("generation"))})
        metrics.SCANS.labels("completed").inc()
        if started:
            metrics.SCAN_DURATION.observe((finished - started).total_seconds())
        for severity in ("critical", "high", "medium", "low", "unknown"):
            metrics.VULNERABILITIES.labels(scan["spec"]["image"], scan["status"].get("digest"),
                                           severity).set(summary[severity])
        counts = ", ".join(f"{summary[s]} {s}" for s in ("critical", "high", "medium", "low"))
        await self.kube.event(scan, "Normal", "ScanCompleted", f"{counts} ({summary['total']} "
                              f"findings in all)")

    async def _attempt_failed(self, scan: Obj, reason: str, message: str) -> None:
        status = scan.get("status") or {}
        attempts = int(status.get("attempts") or 1)
        metrics.SCAN_FAILURES.labels(reason).inc()
        if attempts < self.settings.max_scan_attempts:
            delay = self.retry_backoff * 2 ** (attempts - 1)
            text = (f"attempt {attempts} of {self.settings.max_scan_attempts} failed: {message}; "
                    f"retrying in {int(delay.total_seconds())}s")
            await self._set(scan, {
                "phase": "Queued", "reason": reason, "message": text,
                "retryAfter": stamp(datetime.now(UTC) + delay),
                "conditions": _condition(False, reason, text, scan["metadata"].get("generation"))})
            metrics.SCANS.labels("retried").inc()
            await self.kube.event(scan, "Warning", reason, text)
            return
        await self._fail(scan, reason, f"{message} (after {attempts} attempts)")

    async def _fail(self, scan: Obj, reason: str, message: str) -> None:
        await self._set(scan, {
            "phase": "Failed", "reason": reason, "message": message, "completionTime": now(),
            "retryAfter": None,
            "conditions": _condition(False, reason, message, scan["metadata"].get("generation"))})
        metrics.SCANS.labels("failed").inc()
        await self.kube.event(scan, "Warning", "ScanFailed", message)
