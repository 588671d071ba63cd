"""The ScanRule controller: keeps one ImageScan per matching repository:tag of a rule.

ScanRules come from a watch (scangate.watch); a rule runs when it is new or its spec
changed, on each new value of its scangate.dev/scan-now annotation, and when its
schedule is due (the last run lives in its status, so a restart neither misses nor
doubles a run). A run lists the scope's repositories (from the catalog, or the ones
named) and their tags, keeps those whose whole tag matches the RE2 filter, creates
the ImageScans missing, owned by the rule, deletes those of tags gone, and sends the
scans of tags moved to another digest back to Pending. Push events are not handled
yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from kubernetes.client.exceptions import ApiException

from scangate.api import GROUP, VERSION
from scangate.config import Settings
from scangate.core.destinations import Destinations
from scangate.core.images import InvalidReference, parse_image
from scangate.core.patterns import PatternError, check_tag_filter
from scangate.core.rules import (
    Plan,
    Scope,
    Wanted,
    manual_run_requested,
    reconcile,
    schedule_due,
    trigger_of,
    wanted,
)
from scangate.core.scanstate import (
    SEVERITY_KEYS,
    Ref,
    ScanIndex,
    ScanState,
    parse_time,
    resource_version,
)
from scangate.kube import Kube, Obj, now
from scangate.registry.auth import CredentialsError
from scangate.registry.client import ImageNotFound, RegistryClient, RegistryError
from scangate.scanning.job import scan_label
from scangate.scanning.registries import registry_client
from scangate.watch import Feed, Sink

log = logging.getLogger("scangate.rules")
PLURAL = "scanrules"
SCAN_NOW = "scangate.dev/scan-now"
RULE_LABEL = "scangate.dev/scanrule"
TAG_LISTS_IN_FLIGHT = 4
# The ImageScan's trigger for what started the rule's run.
SCAN_TRIGGER = {"Create": "Manual", "Manual": "Manual", "Schedule": "Schedule"}


@dataclass(frozen=True)
class RuleState:
    """What the controller keeps of one ScanRule (its spec is small)."""

    namespace: str
    name: str
    uid: str
    generation: int
    version: int
    created: datetime
    spec: dict[str, Any] = field(hash=False, compare=False)
    scan_now: str | None = None
    observed: int | None = None
    last_run: datetime | None = None
    last_scan_now: str | None = None
    images: int | None = None
    totals: tuple[int, ...] | None = None

    @property
    def ref(self) -> Ref:
        return (self.namespace, self.name)


def project_rule(obj: Obj) -> RuleState:
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    observed = status.get("observedGeneration")
    return RuleState(
        namespace=str(meta.get("namespace", "")), name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")), generation=int(meta.get("generation") or 0),
        version=resource_version(obj),
        created=parse_time(meta.get("creationTimestamp")) or datetime.now(UTC),
        spec=obj.get("spec") or {},
        scan_now=(meta.get("annotations") or {}).get(SCAN_NOW),
        observed=observed if isinstance(observed, int) else None,
        last_run=parse_time((status.get("lastRun") or {}).get("time")),
        last_scan_now=status.get("lastScanNow"),
        images=status.get("images") if isinstance(status.get("images"), int) else None,
        totals=tuple((status.get("totals") or {}).get(k, 0) for k in (*SEVERITY_KEYS, "total"))
        if isinstance(status.get("totals"), dict) else None)


class RuleController:
    def __init__(self, kube: Kube, settings: Settings, index: ScanIndex,
                 destinations: Destinations) -> None:
        self.kube, self.settings, self.index = kube, settings, index
        self.destinations = destinations
        self.rules: dict[Ref, RuleState] = {}
        self._busy: set[Ref] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._dirty: set[Ref] = set()
        """Rules some of whose ImageScans changed: their totals may have."""
        self.feed = Feed("scanrules", partial(kube.custom.list_cluster_custom_object, GROUP,
                                              VERSION, PLURAL),
                         project_rule, Sink(self._replace, self._upsert, self._delete))

    def _replace(self, rules: list[RuleState]) -> None:
        self.rules = {r.ref: r for r in rules}
        self._wake.set()

    def _upsert(self, rule: RuleState) -> None:
        held = self.rules.get(rule.ref)
        if held is None or rule.version < 0 or rule.version >= held.version:
            self.rules[rule.ref] = rule
            self._wake.set()

    def _delete(self, rule: RuleState) -> None:
        # Its ImageScans go with it: they are owned by it (garbage collection).
        self.rules.pop(rule.ref, None)

    def touch(self, namespace: str, rule: str) -> None:
        """One of the rule's ImageScans changed (called by the scan reconciler)."""
        self._dirty.add((namespace, rule))
        self._wake.set()

    async def run(self) -> None:
        feed = asyncio.create_task(self.feed.run())
        try:
            await self.feed.synced.wait()
            while True:
                self._wake.clear()
                self.reconcile()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.reconcile_interval)
        finally:
            for task in (feed, *self._tasks):
                task.cancel()

    def reconcile(self) -> None:
        current = datetime.now(UTC)
        for rule in list(self.rules.values()):
            if rule.ref in self._busy:
                continue
            schedule = rule.spec.get("triggers", {}).get("schedule")
            due = (schedule_due(schedule, rule.last_run, rule.created, current)
                   if schedule else None)
            trigger = trigger_of(rule.generation, rule.observed,
                                 manual_run_requested(rule.scan_now, rule.last_scan_now),
                                 due, bool(rule.spec.get("suspend")))
            if trigger:
                self._spawn(rule, partial(self._run, rule, trigger))
        dirty, self._dirty = self._dirty, set()
        for ref in dirty:
            held = self.rules.get(ref)
            if held is None:
                continue
            if ref in self._busy:
                self._dirty.add(ref)  # after the work under way
                continue
            images, totals = self._totals(held)
            if (images, tuple(totals.values())) != (held.images, held.totals):
                self._spawn(held, partial(self._patch, held, {"images": images,
                                                              "totals": totals}))

    def _spawn(self, rule: RuleState, work: Callable[[], Awaitable[None]]) -> None:
        self._busy.add(rule.ref)

        async def guarded() -> None:
            try:
                await work()
            except Exception:
                log.exception("run of ScanRule %s/%s failed", *rule.ref)
            finally:
                self._busy.discard(rule.ref)

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one run -----------------------------------------------------------------------

    async def _run(self, rule: RuleState, trigger: str) -> None:
        started = now()
        registry: Obj = rule.spec.get("registry") or {}
        url = str(registry.get("url", "")).rstrip("/")
        host = urlsplit(url).netloc
        scope = Scope(tuple(rule.spec.get("scope", {}).get("namespaces") or ()),
                      tuple(rule.spec.get("scope", {}).get("repositories") or ()))
        try:
            tag_filter = check_tag_filter(rule.spec.get("tagFilter") or ".*")
            secret_ref = registry.get("credentialsSecretRef")
            secret = (await self.kube.get_secret(rule.namespace, secret_ref["name"])
                      if secret_ref else None)
            if secret_ref and secret is None:
                raise CredentialsError(f"credentials Secret {secret_ref['name']} not found")
            client = registry_client(url, registry, secret, host, self.settings,
                                     self.destinations)
            async with client:
                tags = await self._tags(client, scope)
                matched = wanted(rule.name, tags, tag_filter)
                plan = reconcile(matched, [s.name for s in self.index.by_rule(rule.namespace,
                                                                              rule.name)])
                await self._rescan_moved(rule, client, plan)
        except (RegistryError, CredentialsError, PatternError) as e:
            reason = e.reason if isinstance(e, RegistryError) else "InvalidSpec"
            return await self._status(rule, trigger, started, None, {
                "type": "RegistryReachable", "status": "False", "reason": reason,
                "message": str(e)[:4096]})
        for scan in plan.create:
            await self._create_scan(rule, scan, host, trigger)
        for name in plan.delete:
            with contextlib.suppress(ApiException):
                await self.kube.delete_custom("imagescans", rule.namespace, name)
        await self._status(rule, trigger, started, {
            "repositories": len(tags), "tags": len(matched),
            "scansCreated": len(plan.create)}, {
            "type": "RegistryReachable", "status": "True", "reason": "Listed",
            "message": f"listed {len(tags)} repositories of {host}"})

    async def _rescan_moved(self, rule: RuleState, client: RegistryClient, plan: Plan) -> None:
        """Scan again the kept tags that point at another digest than the one scanned:
        back to Pending, the scan resolves the tag anew (one HEAD per tag here)."""
        platform = (rule.spec.get("scan") or {}).get("platform") or "linux/amd64"
        slots = asyncio.Semaphore(TAG_LISTS_IN_FLIGHT)

        async def check(state: ScanState) -> None:
            try:
                async with slots:
                    resolved = await client.resolve(parse_image(state.image), platform)
            except (ImageNotFound, InvalidReference):
                return  # gone since the listing: the next run removes its scan
            if resolved.digest != state.digest:
                await self.kube.patch_status("imagescans", state.namespace, state.name, {
                    "phase": "Pending", "attempts": 0, "retryAfter": None, "reason": None,
                    "message": f"the tag moved to {resolved.digest}: scanning again"})

        settled = [s for s in self.index.by_rule(rule.namespace, rule.name)
                   if s.name not in plan.delete and s.digest
                   and s.phase in ("Completed", "Failed")]
        await asyncio.gather(*(check(s) for s in settled))

    async def _tags(self, client: RegistryClient, scope: Scope) -> dict[str, list[str]]:
        repositories = scope.listed() or [r for r in await client.catalog() if scope.covers(r)]
        slots = asyncio.Semaphore(TAG_LISTS_IN_FLIGHT)

        async def tags_of(repository: str) -> list[str]:
            async with slots:
                try:
                    return await client.tags(repository)
                except ImageNotFound:  # a listed repository that does not exist (yet)
                    return []

        lists = await asyncio.gather(*(tags_of(r) for r in repositories))
        return {r: t for r, t in zip(repositories, lists, strict=True) if t}

    async def _create_scan(self, rule: RuleState, scan: Wanted, host: str,
                           trigger: str) -> None:
        options = rule.spec.get("scan") or {}
        spec: Obj = {"image": scan.image(host), "ruleRef": {"name": rule.name},
                     "trigger": SCAN_TRIGGER[trigger]}
        for key in ("scanners", "ignoreUnfixed", "timeout", "platform"):
            if options.get(key) is not None:
                spec[key] = options[key]
        body = {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageScan",
            "metadata": {"name": scan.name, "namespace": rule.namespace,
                         "labels": {RULE_LABEL: scan_label(rule.name)},
                         "ownerReferences": [{
                             "apiVersion": f"{GROUP}/{VERSION}", "kind": "ScanRule",
                             "name": rule.name, "uid": rule.uid, "controller": True}]},
            "spec": spec}
        await self.kube.create_custom("imagescans", rule.namespace, body)

    def _totals(self, rule: RuleState) -> tuple[int, dict[str, int]]:
        """Images (digests) with a result among the rule's scans, and their findings."""
        totals = dict.fromkeys((*SEVERITY_KEYS, "total"), 0)
        digests = set()
        for scan in self.index.by_rule(rule.namespace, rule.name):
            if scan.summary is not None and scan.digest not in digests:
                digests.add(scan.digest)
                for key, count in zip(totals, scan.summary, strict=True):
                    totals[key] += count
        return len(digests), totals

    async def _patch(self, rule: RuleState, status: Obj) -> None:
        obj = await self.kube.patch_status(PLURAL, rule.namespace, rule.name, status)
        self._upsert(project_rule(obj))

    async def _status(self, rule: RuleState, trigger: str, started: str,
                      last_run: Obj | None, reachable: Obj) -> None:
        images, totals = self._totals(rule)
        ready = reachable["status"] == "True"
        status: Obj = {
            "observedGeneration": rule.generation,
            "lastRun": {"time": started, "trigger": trigger, **(last_run or {})},
            "images": images, "totals": totals,
            "conditions": [
                {"type": "Ready", "status": "True" if ready else "False",
                 "reason": "Ran" if ready else reachable["reason"],
                 "message": "the rule ran" if ready else reachable["message"],
                 "lastTransitionTime": started, "observedGeneration": rule.generation},
                {**reachable, "lastTransitionTime": started,
                 "observedGeneration": rule.generation}]}
        if trigger == "Manual" and rule.scan_now:
            status["lastScanNow"] = rule.scan_now
        await self._patch(rule, status)
