"""When each ScanRule is next looked at: its cron schedule, the retry of a failed run
(a doubling backoff, or the registry's Retry-After), and the hold on a rule whose
handling failed. A heap of due times, so that a pass looks only at the rules due."""

from __future__ import annotations

import contextlib
import heapq
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from scangate.core.rules import (
    ScheduleError,
    manual_run_requested,
    next_due,
    schedule_due,
    trigger_of,
)
from scangate.core.rulestate import RuleState, describe
from scangate.core.scanstate import Ref
from scangate.registry.client import RegistryUnavailable

MAX_RUN_BACKOFF = timedelta(minutes=5)
MAX_FAILURES = 5
"""Attempts at a rule whose handling fails unexpectedly (doubling backoff); then it waits
for a change of its spec or a new scangate.dev/scan-now."""


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


class RuleSchedule:
    """The due times of every rule, its failed runs' retries and its failures."""

    def __init__(self, retry_backoff: timedelta) -> None:
        self.retry_backoff = retry_backoff
        self._due: list[tuple[datetime, Ref]] = []
        """A heap of the times rules are due (schedule or retry); stale entries are skipped."""
        self._due_at: dict[Ref, datetime] = {}
        self._retries: dict[Ref, Retry] = {}
        self._failures: dict[Ref, Failure] = {}

    def forget(self, ref: Ref) -> None:
        """The rule is gone."""
        self._retries.pop(ref, None)
        self._failures.pop(ref, None)
        self._due_at.pop(ref, None)

    def spec_changed(self, ref: Ref) -> None:
        self._retries.pop(ref, None)  # a new spec starts afresh

    def listed(self, ref: Ref) -> None:
        """A run got its listing: no retry pending."""
        self._retries.pop(ref, None)

    def ran(self, ref: Ref) -> None:
        """A run ended well: the rule's failure record ends."""
        self._failures.pop(ref, None)

    def wait(self, interval: float) -> float:
        """Until the next due time, or `interval` (events wake the controller sooner)."""
        if not self._due:
            return interval
        wait = (self._due[0][0] - datetime.now(UTC)).total_seconds()
        return min(max(wait, 0.0), interval)

    def pop_due(self, current: datetime) -> set[Ref]:
        """The rules due by `current`, taken off the heap."""
        refs = set()
        while self._due and self._due[0][0] <= current:
            when, ref = heapq.heappop(self._due)
            if self._due_at.get(ref) == when:
                del self._due_at[ref]
                refs.add(ref)
        return refs

    def _due_then(self, ref: Ref, at: datetime) -> None:
        self._due_at[ref] = at
        heapq.heappush(self._due, (at, ref))

    def trigger(self, rule: RuleState, current: datetime) -> tuple[str | None, datetime | None]:
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

    def schedule_next(self, rule: RuleState) -> None:
        """Put the rule's next due time (schedule or retry) on the heap."""
        times = [r.at for r in (self._retries.get(rule.ref),) if r]
        if rule.schedule and not rule.spec.get("suspend"):
            with contextlib.suppress(ValueError, KeyError):  # the webhook refuses bad crons
                times.append(next_due(rule.schedule, rule.last_scheduled or rule.created))
        if times and self._due_at.get(rule.ref) != min(times):
            self._due_then(rule.ref, min(times))

    def _backoff(self, attempts: int) -> timedelta:
        """The wait before attempt `attempts` + 1: doubling, at most MAX_RUN_BACKOFF."""
        return min(self.retry_backoff * (1 << min(attempts - 1, 16)), MAX_RUN_BACKOFF)

    def retry_later(self, rule: RuleState, trigger: str, error: Exception) -> datetime:
        """Do the failed run again after a doubling backoff (or the registry's Retry-After)."""
        attempts = self._retries[rule.ref].attempts + 1 if rule.ref in self._retries else 1
        delay = self._backoff(attempts)
        if isinstance(error, RegistryUnavailable) and error.retry_after is not None:
            delay = max(delay, timedelta(seconds=min(error.retry_after, MAX_RUN_BACKOFF
                                                     .total_seconds())))
        at = datetime.now(UTC) + delay
        self._retries[rule.ref] = Retry(attempts, at, trigger)
        return at

    # -- a rule whose handling fails ----------------------------------------------------

    def held_back(self, rule: RuleState, current: datetime) -> bool:
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
                self._due_then(rule.ref, failure.at)
            return True
        return False

    def failed(self, rule: RuleState, error: Exception) -> tuple[str, str]:
        """Record that the rule's handling failed, with a retry after a doubling backoff,
        MAX_FAILURES times at most; a schedule with no time is not retried: it only
        changes with the spec. Returns the reason and message to report."""
        held = self._failures.get(rule.ref)
        attempts = held.attempts + 1 if held and held.generation == rule.generation else 1
        if isinstance(error, ScheduleError):
            reason, message, at = "InvalidSchedule", f"spec.triggers.schedule: {error}", None
        else:
            reason, message = "ReconcileFailed", describe(error)
            at = datetime.now(UTC) + self._backoff(attempts) if attempts < MAX_FAILURES else None
        self._failures[rule.ref] = Failure(rule.generation, rule.scan_now, attempts, at)
        then = (f"retrying at {at:%H:%M:%S}Z (attempt {attempts} of {MAX_FAILURES})" if at
                else "left alone until its spec or scangate.dev/scan-now changes")
        if at is not None:
            self._due_then(rule.ref, at)
        return reason, f"{message}; {then}"
