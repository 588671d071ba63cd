"""The ScanRule controller: keeps one ImageScan per matching repository:tag of a rule.

ScanRules come from a watch (scangate.watch); a rule runs when it is new or its spec
changed, on each new value of its scangate.dev/scan-now annotation, and when its
schedule is due (the last scheduled time lives in its status, so a restart neither
misses nor doubles a run); a failed run is retried with a doubling backoff. A run
streams the scope's repositories (from the catalog, page by page, or the ones named)
and their tags with a bounded number of requests in flight per registry, keeps the
tags whose whole name matches the RE2 filter, creates the ImageScans missing, owned
by the rule, deletes those of tags gone, and sends the scans of tags moved to another
digest back to Pending. A push (scangate.scanning.push) creates or rescans the
ImageScan of the pushed tag under each rule that covers it.

Each pass looks only at the rules that changed, whose schedule or retry is due (a heap
of due times), or that are dirty: not at every rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from kubernetes.client.exceptions import ApiException

from scangate import metrics
from scangate.api import GROUP, VERSION
from scangate.api.imagescan import Phase
from scangate.config import Settings
from scangate.core.conditions import condition
from scangate.core.destinations import Destinations
from scangate.core.durations import parse_duration
from scangate.core.images import InvalidReference, parse_image
from scangate.core.patterns import PatternError, TagFilter, check_tag_filter, tag_matches
from scangate.core.rules import (
    Plan,
    ScheduleError,
    Scope,
    Selection,
    Wanted,
    manual_run_requested,
    matching_rules,
    next_due,
    reconcile,
    registry_host,
    scan_name,
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
from scangate.registry.client import (
    MAX_RETRY_DELAY,
    ImageNotFound,
    RegistryClient,
    RegistryError,
    RegistryUnavailable,
)
from scangate.registry.configured import registry_client
from scangate.registry.events import PushedImage
from scangate.scanning.job import scan_label
from scangate.watch import Feed, Sink

log = logging.getLogger("scangate.rules")
PLURAL = "scanrules"
SCAN_NOW = "scangate.dev/scan-now"
RULE_LABEL = "scangate.dev/scanrule"
REQUEST_RETRIES = 3
"""Retries of one registry request answered 429 or 5xx during a run (Retry-After honoured)."""
MAX_RUN_BACKOFF = timedelta(minutes=5)
MAX_FAILURES = 5
"""Attempts at a rule whose handling fails unexpectedly (doubling backoff); then it waits
for a change of its spec or a new scangate.dev/scan-now."""
Work = Callable[[], Awaitable[None]]
# The ImageScan's trigger for what started the rule's run.
SCAN_TRIGGER = {"Create": "Manual", "Manual": "Manual", "Schedule": "Schedule",
                "Push": "Push"}


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
    last_scheduled: datetime | None = None
    last_scan_now: str | None = None
    images: int | None = None
    totals: tuple[int, ...] | None = None
    receivers: list[dict[str, Any]] = field(default_factory=list, hash=False, compare=False)
    """status.notifications: each receiver's delivery state."""
    conditions: list[dict[str, Any]] = field(default_factory=list, hash=False, compare=False)
    """status.conditions, as stored."""

    @property
    def ref(self) -> Ref:
        return (self.namespace, self.name)

    @property
    def registry(self) -> Obj:
        registry = self.spec.get("registry")
        return registry if isinstance(registry, dict) else {}

    @property
    def url(self) -> str:
        return str(self.registry.get("url", "")).rstrip("/")

    @property
    def host(self) -> str:
        """The registry's host[:port], as images name it."""
        return urlsplit(self.url).netloc

    @property
    def scope(self) -> Scope:
        scope = self.spec.get("scope") or {}
        return Scope(tuple(scope.get("namespaces") or ()), tuple(scope.get("repositories") or ()))

    @property
    def schedule(self) -> str | None:
        return (self.spec.get("triggers") or {}).get("schedule") or None


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
        last_scheduled=parse_time(status.get("lastScheduleTime")),
        last_scan_now=status.get("lastScanNow"),
        images=status.get("images") if isinstance(status.get("images"), int) else None,
        totals=tuple((status.get("totals") or {}).get(k, 0) for k in (*SEVERITY_KEYS, "total"))
        if isinstance(status.get("totals"), dict) else None,
        receivers=[r for r in status.get("notifications") or [] if isinstance(r, dict)],
        conditions=[c for c in status.get("conditions") or [] if isinstance(c, dict)])


@dataclass(frozen=True)
class Retry:
    """A failed run to do again."""

    attempts: int
    at: datetime
    trigger: str


@dataclass(frozen=True)
class Failure:
    """A rule whose handling failed (a schedule with no time, anything unexpected): it is
    left alone until `at`, or, with `at` None, until its spec or scan-now changes."""

    generation: int
    scan_now: str | None
    attempts: int
    at: datetime | None


class RuleController:
    def __init__(self, kube: Kube, settings: Settings, index: ScanIndex,
                 destinations: Destinations,
                 rescan: Callable[[ScanState, str], Awaitable[None]]) -> None:
        self.kube, self.settings, self.index = kube, settings, index
        self.destinations = destinations
        self.rescan = rescan
        """Sends a settled ImageScan back to Pending (the scan reconciler's own write)."""
        self.rules: dict[Ref, RuleState] = {}
        self._busy: set[Ref] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._changed: set[Ref] = set()
        """Rules to look at in the next pass: new, changed, or done with a run."""
        self._due: list[tuple[datetime, Ref]] = []
        """A heap of the times rules are due (schedule or retry); stale entries are skipped."""
        self._due_at: dict[Ref, datetime] = {}
        self._retries: dict[Ref, Retry] = {}
        self._failures: dict[Ref, Failure] = {}
        self._dirty: set[Ref] = set()
        """Rules some of whose ImageScans changed: their totals may have."""
        self._filters: dict[Ref, tuple[int, TagFilter | None]] = {}
        """Each rule's compiled tag filter, by the rule's generation."""
        self._registry_slots: dict[str, asyncio.Semaphore] = {}
        self._api_slots = asyncio.Semaphore(settings.api_concurrency)
        self.retry_backoff = parse_duration(settings.retry_backoff)
        self.active: Callable[[], bool] = lambda: True
        """Whether this replica leads (scangate.leader)."""
        self._was_active = False
        self.seen: list[Callable[[RuleState], None]] = []
        """Called with each rule as it is listed or changes (the notifier's receivers)."""
        self.gone: list[Callable[[RuleState], None]] = []
        self.feed = Feed("scanrules", partial(kube.custom.list_cluster_custom_object, GROUP,
                                              VERSION, PLURAL),
                         project_rule, Sink(self._replace, self._upsert, self._delete))

    def _replace(self, rules: list[RuleState]) -> None:
        for held in set(self.rules) - {r.ref for r in rules}:
            self._delete(self.rules[held])
        self.rules = {r.ref: r for r in rules}
        self._changed = set(self.rules)
        self._wake.set()
        for rule in rules:
            self._call_hooks(self.seen, rule)

    def _upsert(self, rule: RuleState) -> None:
        held = self.rules.get(rule.ref)
        if held is None or rule.version < 0 or rule.version >= held.version:
            if held is not None and held.generation != rule.generation:
                self._retries.pop(rule.ref, None)  # a new spec starts afresh
            self.rules[rule.ref] = rule
            self._changed.add(rule.ref)
            self._wake.set()
            self._call_hooks(self.seen, rule)

    def _delete(self, rule: RuleState) -> None:
        # Its ImageScans go with it: they are owned by it (garbage collection).
        self.rules.pop(rule.ref, None)
        self._call_hooks(self.gone, rule)
        self._retries.pop(rule.ref, None)
        self._failures.pop(rule.ref, None)
        self._due_at.pop(rule.ref, None)
        self._filters.pop(rule.ref, None)

    def _call_hooks(self, hooks: list[Callable[[RuleState], None]], rule: RuleState) -> None:
        """Tell the others (the notifier) of a rule; what fails there is that rule's."""
        for hook in hooks:
            try:
                hook(rule)
            except Exception as e:
                log.exception("ScanRule %s/%s: its notifications could not be updated",
                              *rule.ref)
                self._report(rule, "NotificationsFailed",
                             f"its notifications could not be updated: {_describe(e)}")

    def covering(self, image: str) -> list[tuple[str, str, list[Obj]]]:
        """The rules whose registry, scope and tag filter cover an image, with their
        notifications (for Blocked events)."""
        try:
            ref = parse_image(image)
        except InvalidReference:
            return []
        candidates = [(f"{r.namespace}/{r.name}", registry_host(r.host), r.scope, f, True)
                      for r in self.rules.values() if r.spec.get("notifications")
                      and (f := self._tag_filter(r)) is not None]
        found = []
        for match in matching_rules(candidates, registry_host(ref.registry), ref.repository,
                                    ref.tag or ""):
            namespace, _, name = match.partition("/")
            rule = self.rules[(namespace, name)]
            found.append((namespace, name, list(rule.spec.get("notifications") or [])))
        return found

    def registry_of(self, namespace: str, rule: str) -> Obj | None:
        """A held rule's spec.registry."""
        held = self.rules.get((namespace, rule))
        return held.registry if held is not None else None

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
                try:
                    self.reconcile()
                except Exception:  # each rule's failure is its own (below): this is a bug
                    log.exception("a pass over the ScanRules failed")
                    metrics.OBJECT_FAILURES.labels("ScanRule", "PassFailed").inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._sleep())
        finally:
            for task in (feed, *self._tasks):
                task.cancel()

    def _sleep(self) -> float:
        """Until the next due time, or the reconcile interval (events wake it sooner)."""
        if not self._due:
            return self.settings.reconcile_interval
        wait = (self._due[0][0] - datetime.now(UTC)).total_seconds()
        return min(max(wait, 0.0), self.settings.reconcile_interval)

    def reconcile(self) -> None:
        if not self.active():  # only the leader runs rules; the changes wait for it
            self._was_active = False
            return
        if not self._was_active:  # leading now: look at every rule once
            self._was_active = True
            self._changed |= set(self.rules)
        current = datetime.now(UTC)
        refs, self._changed = self._changed, set()
        while self._due and self._due[0][0] <= current:
            when, ref = heapq.heappop(self._due)
            if self._due_at.get(ref) == when:
                del self._due_at[ref]
                refs.add(ref)
        for ref in refs:
            rule = self.rules.get(ref)
            if rule is None:
                continue
            if ref in self._busy:
                continue  # looked at again when the work under way ends
            if self._held_back(rule, current):
                continue
            try:
                trigger, due = self._trigger(rule, current)
                if trigger:
                    self._spawn(rule, partial(self._run, rule, trigger, due), run=True)
                else:
                    self._schedule_next(rule)
            except Exception as e:  # this rule's, never the controller's
                self._failed(rule, e)
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

    def _trigger(self, rule: RuleState, current: datetime) -> tuple[str | None, datetime | None]:
        """Why the rule runs now, if it does, and the scheduled time it stands for."""
        due = (schedule_due(rule.schedule, rule.last_scheduled, rule.created, current)
               if rule.schedule else None)
        trigger = trigger_of(rule.generation, rule.observed,
                             manual_run_requested(rule.scan_now, rule.last_scan_now),
                             due, bool(rule.spec.get("suspend")))
        retry = self._retries.get(rule.ref)
        if trigger is None and retry and retry.at <= current and not rule.spec.get("suspend"):
            trigger = retry.trigger
        return trigger, due if trigger == "Schedule" else None

    def _schedule_next(self, rule: RuleState) -> None:
        """Put the rule's next due time (schedule or retry) on the heap."""
        times = [r.at for r in (self._retries.get(rule.ref),) if r]
        if rule.schedule and not rule.spec.get("suspend"):
            with contextlib.suppress(ValueError, KeyError):  # the webhook refuses bad crons
                times.append(next_due(rule.schedule, rule.last_scheduled or rule.created))
        if times and self._due_at.get(rule.ref) != min(times):
            self._due_at[rule.ref] = min(times)
            heapq.heappush(self._due, (min(times), rule.ref))

    # -- a rule whose handling fails ----------------------------------------------------

    def _held_back(self, rule: RuleState, current: datetime) -> bool:
        """Whether the rule is left alone after a failure: until its retry time, or (after
        the last attempt) until its spec or scan-now annotation changes."""
        failure = self._failures.get(rule.ref)
        if failure is None:
            return False
        if (failure.generation, failure.scan_now) != (rule.generation, rule.scan_now):
            del self._failures[rule.ref]  # changed: a fresh start
            return False
        if failure.at is None or failure.at > current:
            if failure.at is not None and self._due_at.get(rule.ref) != failure.at:
                self._due_at[rule.ref] = failure.at
                heapq.heappush(self._due, (failure.at, rule.ref))
            return True
        return False

    def _failed(self, rule: RuleState, error: Exception) -> None:
        """The rule's handling failed: a condition, an Event and a metric on it, and a
        retry with a doubling backoff, MAX_FAILURES times at most. A schedule with no
        time is not retried: it only changes with the spec."""
        held = self._failures.get(rule.ref)
        attempts = held.attempts + 1 if held and held.generation == rule.generation else 1
        if isinstance(error, ScheduleError):
            reason, message, at = "InvalidSchedule", f"spec.triggers.schedule: {error}", None
        else:
            log.error("ScanRule %s/%s: its handling failed", *rule.ref, exc_info=error)
            reason, message = "ReconcileFailed", _describe(error)
            delay = min(self.retry_backoff * (1 << min(attempts - 1, 16)), MAX_RUN_BACKOFF)
            at = datetime.now(UTC) + delay if attempts < MAX_FAILURES else None
        self._failures[rule.ref] = Failure(rule.generation, rule.scan_now, attempts, at)
        then = (f"retrying at {at:%H:%M:%S}Z (attempt {attempts} of {MAX_FAILURES})" if at
                else "left alone until its spec or scangate.dev/scan-now changes")
        self._report(rule, reason, f"{message}; {then}")
        if at is not None:
            self._due_at[rule.ref] = at
            heapq.heappush(self._due, (at, rule.ref))

    def _report(self, rule: RuleState, reason: str, message: str) -> None:
        """Ready False with `reason` on the rule (its other conditions kept), a Warning
        Event and the metric; by the leader only, never failing in turn."""
        held = next((c for c in rule.conditions if c.get("type") == "Ready"), {})
        if (held.get("status"), held.get("reason"), held.get("message")) == (
                "False", reason, message[:4000]):
            return  # said already: our own write, coming back through the watch
        metrics.OBJECT_FAILURES.labels("ScanRule", reason).inc()
        if not self.active():
            return
        stamp = now()
        kept = [c for c in rule.conditions if c.get("type") != "Ready"]
        ready = condition("Ready", "False", reason, message[:4000], rule.generation,
                          rule.conditions, stamp)
        obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ScanRule",
               "metadata": {"name": rule.name, "namespace": rule.namespace, "uid": rule.uid}}

        async def write() -> None:
            try:
                await self.kube.patch_status(PLURAL, rule.namespace, rule.name,
                                             {"conditions": [ready, *kept]})
                await self.kube.event(obj, "Warning", reason, message)
            except Exception as e:  # deleted meanwhile, or the API server away
                log.warning("ScanRule %s/%s: could not record %s: %s", *rule.ref, reason,
                            _describe(e))

        task = asyncio.create_task(write())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn(self, rule: RuleState, work: Callable[[], Awaitable[None]],
               run: bool = False) -> None:
        """Work on one rule, its failure the rule's own; a `run` that ends well ends the
        rule's failure record."""
        self._busy.add(rule.ref)

        async def guarded() -> None:
            try:
                await work()
                if run:
                    self._failures.pop(rule.ref, None)
            except ApiException as e:
                if e.status != 404:  # 404: the rule was deleted meanwhile
                    self._failed(rule, e)
            except Exception as e:
                self._failed(rule, e)
            finally:
                self._busy.discard(rule.ref)
                self._changed.add(rule.ref)
                self._wake.set()

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _slots(self, host: str) -> asyncio.Semaphore:
        """Requests in flight to one registry, across all rules and pushes."""
        return self._registry_slots.setdefault(
            host, asyncio.Semaphore(self.settings.registry_concurrency))

    def _tag_filter(self, rule: RuleState) -> TagFilter | None:
        held = self._filters.get(rule.ref)
        if held is None or held[0] != rule.generation:
            try:
                compiled: TagFilter | None = check_tag_filter(rule.spec.get("tagFilter") or ".*")
            except PatternError:
                compiled = None  # the webhook refuses it; a run reports it
            held = self._filters[rule.ref] = (rule.generation, compiled)
        return held[1]

    # -- one run -----------------------------------------------------------------------

    async def _run(self, rule: RuleState, trigger: str, scheduled: datetime | None) -> None:
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
            retry = self._retry_later(rule, trigger, e)
            return await self._status(rule, trigger, started, scheduled, None, {
                "type": "RegistryReachable", "status": "False", "reason": reason,
                "message": str(e)[:3900]}, retry=retry)
        self._retries.pop(rule.ref, None)
        await self._each(self._api_slots, (partial(self._create_scan, rule, scan, host, trigger)
                                           for scan in plan.create))
        await self._each(self._api_slots, (partial(self._delete_scan, rule, name)
                                           for name in plan.delete))
        await self._status(rule, trigger, started, scheduled, {
            "repositories": repositories, "tags": len(matched),
            "scansCreated": len(plan.create)}, {
            "type": "RegistryReachable", "status": "True", "reason": "Listed",
            "message": f"listed {repositories} repositories of {host}"}, too_large)

    def _retry_later(self, rule: RuleState, trigger: str, error: Exception) -> datetime:
        """Do the failed run again after a doubling backoff (or the registry's Retry-After)."""
        attempts = self._retries[rule.ref].attempts + 1 if rule.ref in self._retries else 1
        delay = min(self.retry_backoff * (1 << min(attempts - 1, 16)), MAX_RUN_BACKOFF)
        if isinstance(error, RegistryUnavailable) and error.retry_after is not None:
            delay = max(delay, timedelta(seconds=min(error.retry_after, MAX_RUN_BACKOFF
                                                     .total_seconds())))
        at = datetime.now(UTC) + delay
        self._retries[rule.ref] = Retry(attempts, at, trigger)
        return at

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
        client.backoff = min(self.retry_backoff.total_seconds(), MAX_RETRY_DELAY) / 4
        return client

    @staticmethod
    async def _each(slots: asyncio.Semaphore, work: Iterable[Work] | AsyncIterable[Work]
                    ) -> None:
        """Run each piece of work with at most `slots` at once, starting one only when a
        slot is free (memory stays that of the slots, not of the work); the first error
        is raised once the others in flight are done."""
        running: set[asyncio.Task[None]] = set()
        failed: list[BaseException] = []

        async def one(piece: Work) -> None:
            try:
                await piece()
            finally:
                slots.release()

        def done(task: asyncio.Task[None]) -> None:
            running.discard(task)
            if not task.cancelled() and task.exception():
                failed.append(task.exception())  # type: ignore[arg-type]

        async def pieces() -> AsyncIterator[Work]:
            if isinstance(work, AsyncIterable):
                async for piece in work:
                    yield piece
            else:
                for piece in work:
                    yield piece

        try:
            async for piece in pieces():
                await slots.acquire()
                if failed:
                    slots.release()
                    break
                task = asyncio.create_task(one(piece))
                running.add(task)
                task.add_done_callback(done)
            await asyncio.gather(*running, return_exceptions=True)
        finally:
            for task in running:
                task.cancel()
        if failed:
            raise failed[0]

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

        await self._each(self._slots(rule.host), work())
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
        await self._each(self._slots(rule.host), (partial(check, s) for s in settled))

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

    async def _delete_scan(self, rule: RuleState, name: str) -> None:
        with contextlib.suppress(ApiException):  # already gone
            await self.kube.delete_custom("imagescans", rule.namespace, name)

    # -- pushes ------------------------------------------------------------------------

    async def on_push(self, images: Iterable[PushedImage]) -> list[Ref]:
        """Scan each pushed tag under every rule that covers it: create its ImageScan, or
        send the one there back to Pending when it holds another digest's result. An
        event repeated (registries retry) or a tag pushed again with the same digest
        changes nothing. Returns the ImageScans created or rescanned."""
        rules = [(rule, filter_) for rule in self.rules.values()
                 if (filter_ := self._tag_filter(rule)) is not None]
        candidates = [(f"{r.namespace}/{r.name}", registry_host(r.host), r.scope, f,
                       (r.spec.get("triggers") or {}).get("onPush", True)
                       and not r.spec.get("suspend")) for r, f in rules]
        by_ref = {f"{r.namespace}/{r.name}": r for r, _ in rules}
        work: list[Work] = []
        touched: list[Ref] = []
        for image in images:
            if not image.tag:
                continue  # by digest: an index's platform manifests, then the index's tag
            for ref in matching_rules(candidates, registry_host(image.host), image.repository,
                                      image.tag):
                rule = by_ref[ref]
                name = scan_name(rule.name, image.repository, image.tag)
                held = self.index.scans.get((rule.namespace, name))
                if held is None:
                    work.append(partial(self._create_scan, rule,
                                        Wanted(name, image.repository, image.tag),
                                        rule.host, "Push"))
                elif held.phase in (Phase.COMPLETED, Phase.FAILED) and image.digest != held.digest:
                    # Pushed again (by the plain format: with no digest, so resolve anew).
                    work.append(partial(self.rescan, held, "the tag was pushed again"))
                else:
                    continue
                touched.append((rule.namespace, name))
        await self._each(self._api_slots, work)
        return touched

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
                      scheduled: datetime | None, last_run: Obj | None,
                      reachable: Obj, too_large: str | None = None,
                      retry: datetime | None = None) -> None:
        """`too_large`: after a run that listed, why not every matching tag is scanned
        ("" when all are); None when the run did not get that far. `retry`: when a failed
        run is tried again (in the conditions, not the Event, so that Kubernetes counts
        the repeats of one failure on one Event)."""
        images, totals = self._totals(rule)
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
        await self._patch(rule, status)
        obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ScanRule",
               "metadata": {"name": rule.name, "namespace": rule.namespace, "uid": rule.uid}}
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


def _describe(error: BaseException) -> str:
    """A failure in one line for a condition or an Event (never a traceback)."""
    if isinstance(error, ApiException):
        return f"the API server answered {error.status} {error.reason}"
    return f"{type(error).__name__}: {str(error)[:500]}"
