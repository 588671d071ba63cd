"""One run of a ScanRule: stream the scope's repositories (from the catalog, page by
page, or the ones named) and their tags with a bounded number of requests in flight per
registry, keep the tags whose whole name matches the RE2 filter, create the ImageScans
missing, owned by the rule, delete those of tags gone, send the scans of tags moved to
another digest back to Pending, and record the run: the rule's status, its conditions
and an Event."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from functools import partial

from kubernetes.client.exceptions import ApiException

from scangate import metrics
from scangate.api import GROUP, VERSION
from scangate.api.imagescan import Phase
from scangate.cache import Cache
from scangate.config import Settings
from scangate.core.conditions import condition
from scangate.core.destinations import Destinations
from scangate.core.images import InvalidReference, parse_image
from scangate.core.patterns import PatternError, TagFilter, check_tag_filter, tag_matches
from scangate.core.rules import Plan, Scope, Selection, Wanted, reconcile, rule_totals, wanted
from scangate.core.rulestate import PLURAL, RULE_LABEL, RuleState
from scangate.core.scanstate import ScanState
from scangate.kube import Kube, Obj, now
from scangate.registry.auth import CredentialsError
from scangate.registry.client import (
    MAX_RETRY_DELAY,
    ImageNotFound,
    RegistryClient,
    RegistryError,
)
from scangate.registry.configured import registry_client
from scangate.scanning.bounded import Work, each
from scangate.scanning.job import scan_label
from scangate.scanning.ruleschedule import RuleSchedule

REQUEST_RETRIES = 3
"""Retries of one registry request answered 429 or 5xx during a run (Retry-After honoured)."""
# The ImageScan's trigger for what started the rule's run.
SCAN_TRIGGER = {"Create": "Manual", "Manual": "Manual", "Schedule": "Schedule",
                "Push": "Push"}


class RuleRunner:
    """Runs rules and writes what they own: their ImageScans and their status."""

    def __init__(self, kube: Kube, settings: Settings, cache: Cache,
                 destinations: Destinations, schedule: RuleSchedule) -> None:
        self.kube, self.settings, self.cache = kube, settings, cache
        self.index = cache.scans
        self.destinations = destinations
        self.schedule = schedule
        self._registry_slots: dict[str, asyncio.Semaphore] = {}
        self.api_slots = asyncio.Semaphore(settings.api_concurrency)

    def slots(self, host: str) -> asyncio.Semaphore:
        """Requests in flight to one registry, across all rules and pushes."""
        return self._registry_slots.setdefault(
            host, asyncio.Semaphore(self.settings.registry_concurrency))

    def totals(self, rule: RuleState) -> tuple[int, dict[str, int]]:
        """Images (digests) with a result among the rule's scans, and their findings."""
        return rule_totals(self.index.by_rule(rule.namespace, rule.name))

    async def run(self, rule: RuleState, trigger: str, scheduled: datetime | None) -> None:
        started = now()
        host = rule.host
        try:
            tag_filter = check_tag_filter(rule.spec.get("tagFilter") or ".*")
            async with await self._client(rule) as client:
                repositories, matched, too_large = await self._wanted(rule, client,
                                                                      tag_filter)
                plan = reconcile(matched, [s.name for s in self.index.by_rule(rule.namespace,
                                                                              rule.name)])
                await self._rescan_moved(rule, client, plan)
        except (RegistryError, CredentialsError, PatternError) as e:
            reason = e.reason if isinstance(e, RegistryError) else "InvalidSpec"
            retry = self.schedule.retry_later(rule, trigger, e)
            return await self._status(rule, trigger, started, scheduled, None, {
                "type": "RegistryReachable", "status": "False", "reason": reason,
                "message": str(e)[:3900]}, retry=retry)
        self.schedule.listed(rule.ref)
        await each(self.api_slots, (partial(self.create_scan, rule, scan, host, trigger)
                                    for scan in plan.create))
        await each(self.api_slots, (partial(self._delete_scan, rule, name)
                                    for name in plan.delete))
        await self._status(rule, trigger, started, scheduled, {
            "repositories": repositories, "tags": len(matched),
            "scansCreated": len(plan.create)}, {
            "type": "RegistryReachable", "status": "True", "reason": "Listed",
            "message": f"listed {repositories} repositories of {host}"}, too_large)

    async def _client(self, rule: RuleState) -> RegistryClient:
        """A client of the rule's registry with its credentials; raises CredentialsError."""
        secret_ref = rule.registry.get("credentialsSecretRef")
        secret = (await self.kube.get_secret(rule.namespace, secret_ref["name"])
                  if secret_ref else None)
        if secret_ref and secret is None:
            raise CredentialsError(f"credentials Secret {secret_ref['name']} not found")
        client = registry_client(rule.url, rule.registry, secret, rule.host, self.settings,
                                 self.destinations)
        client.retries = REQUEST_RETRIES
        client.backoff = min(self.schedule.retry_backoff.total_seconds(), MAX_RETRY_DELAY) / 4
        return client

    async def _wanted(self, rule: RuleState, client: RegistryClient, tag_filter: TagFilter
                      ) -> tuple[int, dict[str, Wanted], str]:
        """The repositories with matching tags, the ImageScans wanted for them, and why
        not all matching tags are wanted ("" when they are). Bounded: at most
        MAX_TAGS_PER_REPOSITORY of a repository (its last in lexical order) and
        MAX_TAGS_PER_RULE in all (the first repositories in lexical order), so memory
        and the ImageScans made stay within the caps however many tags a registry lists."""
        per_repository = self.settings.max_tags_per_repository
        selection = Selection(self.settings.max_tags_per_rule)
        repositories = 0
        cut: list[str] = []

        def keep(tag: str) -> bool:
            return tag_matches(tag_filter, tag)

        async def list_tags(repository: str) -> None:
            nonlocal repositories
            try:
                listing = await client.list_tags(repository, keep, per_repository)
            except ImageNotFound:  # a listed repository that does not exist (yet)
                return
            repositories += bool(listing.tags)
            if listing.truncated:
                cut.append(f"{repository}: {listing.truncated}")
            selection.add(repository, listing.tags)

        async def work() -> AsyncIterator[Work]:
            async for repository in self._repositories(client, rule.scope):
                yield partial(list_tags, repository)

        await each(self.slots(rule.host), work())
        why = []
        if cut:
            cut.sort()
            why.append(f"{len(cut)} repositories have more than MAX_TAGS_PER_REPOSITORY "
                       f"({per_repository}) matching tags or too long a tag list ("
                       + "; ".join(cut[:5]) + ("; ..." if len(cut) > 5 else "") + ")")
        if selection.dropped:
            why.append(f"{selection.offered} tags would be scanned, more than "
                       f"MAX_TAGS_PER_RULE ({selection.most}): the first "
                       f"{selection.most} by repository and tag are, "
                       f"{selection.dropped} not")
        return repositories, wanted(rule.name, selection.by_repository(),
                                    tag_filter), "; ".join(why)

    @staticmethod
    async def _repositories(client: RegistryClient, scope: Scope) -> AsyncIterator[str]:
        listed = scope.listed()
        if listed:
            for repository in listed:
                yield repository
            return
        async for page in client.catalog():
            for repository in page:
                if scope.covers(repository):
                    yield repository

    async def _rescan_moved(self, rule: RuleState, client: RegistryClient, plan: Plan) -> None:
        """Scan again the kept tags that point at another digest than the one scanned:
        back to Pending, the scan resolves the tag anew (one HEAD per tag here)."""
        platform = (rule.spec.get("scan") or {}).get("platform") or "linux/amd64"

        async def check(state: ScanState) -> None:
            try:
                resolved = await client.resolve(parse_image(state.image), platform)
            except (ImageNotFound, InvalidReference):
                return  # gone since the listing: the next run removes its scan
            if resolved.digest != state.digest:
                await self.rescan(state, f"the tag moved to {resolved.digest}")

        settled = [s for s in self.index.by_rule(rule.namespace, rule.name)
                   if s.name not in plan.delete and s.digest
                   and s.phase in (Phase.COMPLETED, Phase.FAILED)]
        await each(self.slots(rule.host), (partial(check, s) for s in settled))

    async def rescan(self, scan: ScanState, why: str) -> None:
        """Ask for an ImageScan to be scanned again: a new status.rescanRequest, the one
        field of its status the rule writes (the scan reconciler answers it)."""
        obj = await self.kube.patch_status("imagescans", scan.namespace, scan.name,
                                           {"rescanRequest": f"{why} ({now()})"[:512]})
        self.cache.imagescans.apply(obj)

    async def create_scan(self, rule: RuleState, scan: Wanted, host: str,
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

    async def _delete_scan(self, rule: RuleState, name: str) -> None:
        with contextlib.suppress(ApiException):  # already gone
            await self.kube.delete_custom("imagescans", rule.namespace, name)

    # -- the rule's status -------------------------------------------------------------

    async def patch(self, rule: RuleState, status: Obj) -> None:
        obj = await self.kube.patch_status(PLURAL, rule.namespace, rule.name, status)
        self.cache.scanrules.apply(obj)

    async def _status(self, rule: RuleState, trigger: str, started: str,
                      scheduled: datetime | None, last_run: Obj | None,
                      reachable: Obj, too_large: str | None = None,
                      retry: datetime | None = None) -> None:
        """`too_large`: after a run that listed, why not every matching tag is scanned
        ("" when all are); None when the run did not get that far. `retry`: when a failed
        run is tried again (in the conditions, not the Event, so that Kubernetes counts
        the repeats of one failure on one Event)."""
        images, totals = self.totals(rule)
        ready = reachable["status"] == "True"
        status: Obj = {
            "observedGeneration": rule.generation,
            "lastRun": {"time": started, "trigger": trigger, **(last_run or {})},
            "images": images, "totals": totals,
            "conditions": [
                condition("Ready", "True" if ready else "False",
                          "Ran" if ready else reachable["reason"],
                          "the rule ran" if ready else _with_retry(reachable["message"], retry),
                          rule.generation, rule.conditions, started),
                condition("RegistryReachable", reachable["status"], reachable["reason"],
                          _with_retry(reachable["message"], retry), rule.generation,
                          rule.conditions, started)]}
        held = next((c for c in rule.conditions if c.get("type") == "TooLarge"), None)
        if too_large is None and held is not None:
            status["conditions"].append(held)  # a failed run does not know: kept
        if too_large is not None:
            status["conditions"].append(condition(
                "TooLarge", "True" if too_large else "False",
                "RuleTooLarge" if too_large else "WithinLimits",
                (f"scanning only part of what the rule matches: {too_large}"[:3900]
                 if too_large else "every matching tag is scanned"),
                rule.generation, rule.conditions, started))
        if trigger == "Manual" and rule.scan_now:
            status["lastScanNow"] = rule.scan_now
        what = f"{trigger} run"
        if scheduled is not None:
            status["lastScheduleTime"] = scheduled.strftime("%Y-%m-%dT%H:%M:%SZ")
            what += f" for {status['lastScheduleTime']}"
        await self.patch(rule, status)
        obj = rule.involved
        if too_large:
            metrics.RULES_TOO_LARGE.labels(rule.namespace, rule.name).inc()
            await self.kube.event(obj, "Warning", "RuleTooLarge",
                                  f"{what}: scanning only part of what the rule matches: "
                                  f"{too_large}")
        if ready:
            await self.kube.event(obj, "Normal", "Ran", f"{what}: {last_run}")
        else:
            await self.kube.event(obj, "Warning", "RunFailed",
                                  f"{what}: {reachable['reason']}: {reachable['message']}")


def _with_retry(message: str, retry: datetime | None) -> str:
    return f"{message}; retrying at {retry:%H:%M:%S}Z" if retry else message
