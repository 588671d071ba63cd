"""The ScanRule controller: keeps one ImageScan per matching repository:tag of a rule.

ScanRules come from the shared cache (scangate.cache), and kopf's change handlers
(scangate.handlers.scanrules) ask for a look at a rule; a rule runs when it is new or its
spec changed, on each new value of its scangate.dev/scan-now annotation, and when its
schedule is due (the last scheduled time lives in its status, so a restart neither
misses nor doubles a run); a failed run is retried with a doubling backoff. A run
streams the scope's repositories (from the catalog, page by page, or the ones named)
and their tags with a bounded number of requests in flight per registry, keeps the
tags whose whole name matches the RE2 filter, creates the ImageScans missing, owned
by the rule, deletes those of tags gone, and sends the scans of tags moved to another
digest to be scanned again (a new status.rescanRequest on the ImageScan, which the
scan reconciler answers). A push (scangate.scanning.push) creates or rescans the
ImageScan of the pushed tag under each rule that covers it.

Each pass looks only at the rules that changed, whose schedule or retry is due (a heap
of due times), or that are dirty: not at every rule.

Here the controller: the passes, each rule's work and its failures. Beside
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
from scangate.cache import Cache
from scangate.config import Settings
from scangate.core.conditions import condition
from scangate.core.destinations import Destinations
from scangate.core.durations import parse_duration
from scangate.core.rules import ScheduleError
from scangate.core.rulestate import PLURAL, RuleState, describe
from scangate.core.scanstate import Ref, ScanState
from scangate.kube import Kube, now
from scangate.registry.events import PushedImage
from scangate.scanning.bounded import Work, each
from scangate.scanning.rulepush import pushed_scans
from scangate.scanning.rulerun import RuleRunner
from scangate.scanning.ruleschedule import RuleSchedule

log = logging.getLogger("scangate.rules")


class RuleController:
    def __init__(self, kube: Kube, settings: Settings, cache: Cache,
                 destinations: Destinations) -> None:
        self.kube, self.settings, self.cache = kube, settings, cache
        self.index = cache.scans
        self.rules = cache.scanrules.items
        self._busy: set[Ref] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._changed: set[Ref] = set()
        """Rules to look at in the next pass: new, changed, or done with a run."""
        self.schedule = RuleSchedule(parse_duration(settings.retry_backoff))
        self.runner = RuleRunner(kube, settings, cache, destinations, self.schedule)
        self._dirty: set[Ref] = set()
        """Rules some of whose ImageScans changed: their totals may have."""
        self.active: Callable[[], bool] = lambda: True
        """Whether this replica leads (scangate.leader)."""
        self._was_active = False
        self._generations: dict[Ref, int] = {}
        cache.scanrules.subscribe(self._rule_changed)
        cache.imagescans.subscribe(self._scan_changed)

    def _rule_changed(self, rule: RuleState, gone: bool) -> None:
        if gone:
            # Its ImageScans go with it: they are owned by it (garbage collection).
            self._generations.pop(rule.ref, None)
            self.schedule.forget(rule.ref)
            return
        if self._generations.get(rule.ref, rule.generation) != rule.generation:
            self.schedule.spec_changed(rule.ref)
        self._generations[rule.ref] = rule.generation
        self.look_at(rule.ref)

    def _scan_changed(self, scan: ScanState, gone: bool) -> None:
        """One of a rule's ImageScans changed or went: its totals may have."""
        if scan.owner:
            self._dirty.add((scan.namespace, scan.owner))
            self._wake.set()

    def look_at(self, ref: Ref) -> None:
        """Look at the rule in the next pass (kopf's change handlers ask)."""
        self._changed.add(ref)
        self._wake.set()

    async def run(self) -> None:
        try:
            await self.cache.scanrules.synced.wait()
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
            for task in self._tasks:
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

    # -- pushes ------------------------------------------------------------------------

    async def on_push(self, images: Iterable[PushedImage]) -> list[Ref]:
        """Scan each pushed tag under every rule that covers it (rulepush.py): create its
        ImageScan, or send the one there back to Pending when it holds another digest's
        result. Returns the ImageScans created or rescanned."""
        rules = [(rule, filter_) for rule in self.rules.values()
                 if (filter_ := rule.tag_filter) is not None]
        found = pushed_scans(images, rules, self.index.scans)
        work: list[Work] = [
            partial(self.runner.create_scan, p.rule, p.wanted, p.rule.host, "Push")
            if p.held is None else partial(self.runner.rescan, p.held, "the tag was pushed again")
            for p in found]
        await each(self.runner.api_slots, work)
        return [p.ref for p in found]
