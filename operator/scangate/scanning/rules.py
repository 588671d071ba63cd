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

Here the controller: the watch, the passes, each rule's work and its failures. Beside
it, by concern: what it holds of a rule (rulestate.py), when a rule is due
(ruleschedule.py), one run and the rule's status (rulerun.py), what a push asks for
(rulepush.py); the rules' totals are core.rules.rule_totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from functools import partial

from kubernetes.client.exceptions import ApiException

from scangate import metrics
from scangate.api import GROUP, VERSION
from scangate.config import Settings
from scangate.core.conditions import condition
from scangate.core.destinations import Destinations
from scangate.core.durations import parse_duration
from scangate.core.images import InvalidReference, parse_image
from scangate.core.patterns import PatternError, TagFilter, check_tag_filter
from scangate.core.rules import ScheduleError, matching_rules, registry_host
from scangate.core.scanstate import Ref, ScanIndex, ScanState
from scangate.kube import Kube, Obj, now
from scangate.registry.events import PushedImage
from scangate.scanning.bounded import Work, each
from scangate.scanning.rulepush import pushed_scans
from scangate.scanning.rulerun import RuleRunner
from scangate.scanning.ruleschedule import RuleSchedule
from scangate.scanning.rulestate import PLURAL, RuleState, describe, project_rule
from scangate.watch import Feed, Sink

log = logging.getLogger("scangate.rules")


class RuleController:
    def __init__(self, kube: Kube, settings: Settings, index: ScanIndex,
                 destinations: Destinations,
                 rescan: Callable[[ScanState, str], Awaitable[None]]) -> None:
        self.kube, self.settings, self.index = kube, settings, index
        self.rules: dict[Ref, RuleState] = {}
        self._busy: set[Ref] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._changed: set[Ref] = set()
        """Rules to look at in the next pass: new, changed, or done with a run."""
        self.schedule = RuleSchedule(parse_duration(settings.retry_backoff))
        self.runner = RuleRunner(kube, settings, index, destinations, self.schedule, rescan,
                                 self._upsert)
        self._dirty: set[Ref] = set()
        """Rules some of whose ImageScans changed: their totals may have."""
        self._filters: dict[Ref, tuple[int, TagFilter | None]] = {}
        """Each rule's compiled tag filter, by the rule's generation."""
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
                self.schedule.spec_changed(rule.ref)
            self.rules[rule.ref] = rule
            self._changed.add(rule.ref)
            self._wake.set()
            self._call_hooks(self.seen, rule)

    def _delete(self, rule: RuleState) -> None:
        # Its ImageScans go with it: they are owned by it (garbage collection).
        self.rules.pop(rule.ref, None)
        self._call_hooks(self.gone, rule)
        self.schedule.forget(rule.ref)
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
                             f"its notifications could not be updated: {describe(e)}")

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
                    await asyncio.wait_for(self._wake.wait(),
                                           self.schedule.wait(self.settings.reconcile_interval))
        finally:
            for task in (feed, *self._tasks):
                task.cancel()

    def reconcile(self) -> None:
        if not self.active():  # only the leader runs rules; the changes wait for it
            self._was_active = False
            return
        if not self._was_active:  # leading now: look at every rule once
            self._was_active = True
            self._changed |= set(self.rules)
        current = datetime.now(UTC)
        refs, self._changed = self._changed, set()
        refs |= self.schedule.pop_due(current)
        for ref in refs:
            rule = self.rules.get(ref)
            if rule is None:
                continue
            if ref in self._busy:
                continue  # looked at again when the work under way ends
            if self.schedule.held_back(rule, current):
                continue
            try:
                trigger, due = self.schedule.trigger(rule, current)
                if trigger:
                    self._spawn(rule, partial(self.runner.run, rule, trigger, due), run=True)
                else:
                    self.schedule.schedule_next(rule)
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
            images, totals = self.runner.totals(held)
            if (images, tuple(totals.values())) != (held.images, held.totals):
                self._spawn(held, partial(self.runner.patch, held, {"images": images,
                                                                    "totals": totals}))

    # -- a rule whose handling fails ----------------------------------------------------

    def _failed(self, rule: RuleState, error: Exception) -> None:
        """The rule's handling failed: a condition, an Event and a metric on it, and a
        retry with a doubling backoff, MAX_FAILURES times at most (ruleschedule.py)."""
        if not isinstance(error, ScheduleError):
            log.error("ScanRule %s/%s: its handling failed", *rule.ref, exc_info=error)
        self._report(rule, *self.schedule.failed(rule, error))

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

        async def write() -> None:
            try:
                await self.kube.patch_status(PLURAL, rule.namespace, rule.name,
                                             {"conditions": [ready, *kept]})
                await self.kube.event(rule.involved, "Warning", reason, message)
            except Exception as e:  # deleted meanwhile, or the API server away
                log.warning("ScanRule %s/%s: could not record %s: %s", *rule.ref, reason,
                            describe(e))

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
                    self.schedule.ran(rule.ref)
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

    def _tag_filter(self, rule: RuleState) -> TagFilter | None:
        held = self._filters.get(rule.ref)
        if held is None or held[0] != rule.generation:
            try:
                compiled: TagFilter | None = check_tag_filter(rule.spec.get("tagFilter") or ".*")
            except PatternError:
                compiled = None  # the webhook refuses it; a run reports it
            held = self._filters[rule.ref] = (rule.generation, compiled)
        return held[1]

    # -- pushes ------------------------------------------------------------------------

    async def on_push(self, images: Iterable[PushedImage]) -> list[Ref]:
        """Scan each pushed tag under every rule that covers it (rulepush.py): create its
        ImageScan, or send the one there back to Pending when it holds another digest's
        result. Returns the ImageScans created or rescanned."""
        rules = [(rule, filter_) for rule in self.rules.values()
                 if (filter_ := self._tag_filter(rule)) is not None]
        found = pushed_scans(images, rules, self.index.scans)
        work: list[Work] = [
            partial(self.runner.create_scan, p.rule, p.wanted, p.rule.host, "Push")
            if p.held is None else partial(self.runner.rescan, p.held, "the tag was pushed again")
            for p in found]
        await each(self.runner.api_slots, work)
        return [p.ref for p in found]
