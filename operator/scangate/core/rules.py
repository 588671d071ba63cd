"""What a ScanRule covers and when it runs: pure decisions for the ScanRule controller.

A rule names registry namespaces (the first path component of a repository) or
repositories inside one namespace, and an RE2 tag filter matched against whole
tags. Each matching repository:tag is kept scanned by one ImageScan in the
rule's namespace, with a name derived from the rule, the repository and the tag,
so that a rerun finds the same objects instead of creating new ones.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from croniter import croniter

from scangate.core.images import registry_host as registry_host  # rules name hosts so too
from scangate.core.patterns import TagFilter, tag_matches
from scangate.core.scanstate import SEVERITY_KEYS, ScanState

MAX_NAME = 253
_UNSAFE = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class Scope:
    namespaces: tuple[str, ...]
    repositories: tuple[str, ...] = ()

    def covers(self, repository: str) -> bool:
        """Whether a repository (e.g. team-a/api or team-a/sub/api) is in scope: under
        one of the namespaces, and one of the listed repositories when some are."""
        namespace, _, name = repository.partition("/")
        if namespace not in self.namespaces or not name:
            return False
        return not self.repositories or name in self.repositories

    def listed(self) -> list[str] | None:
        """The repositories to read without the catalog, when the scope names them."""
        if not self.repositories:
            return None
        return [f"{self.namespaces[0]}/{name}" for name in self.repositories]


def scan_name(rule: str, repository: str, tag: str) -> str:
    """The ImageScan of one repository:tag of a rule: readable, a valid object name, and
    unique (a hash of the exact triple keeps `a/b-c` and `a-b/c` apart)."""
    digest = hashlib.sha256(f"{rule}\0{repository}\0{tag}".encode()).hexdigest()[:10]
    readable = _UNSAFE.sub("-", f"{rule}-{repository}-{tag}".lower()).strip("-")
    return f"{readable[:MAX_NAME - 11].rstrip('-')}-{digest}"


@dataclass(frozen=True)
class Wanted:
    """One image a rule keeps scanned."""

    name: str
    repository: str
    tag: str

    def image(self, registry_host: str) -> str:
        return f"{registry_host}/{self.repository}:{self.tag}"


def wanted(rule: str, tags_by_repository: Mapping[str, Iterable[str]],
           tag_filter: TagFilter) -> dict[str, Wanted]:
    """The ImageScans a rule wants, by name, for the tags a registry listed."""
    found: dict[str, Wanted] = {}
    for repository, tags in tags_by_repository.items():
        for tag in tags:
            if tag_matches(tag_filter, tag):
                name = scan_name(rule, repository, tag)
                found[name] = Wanted(name, repository, tag)
    return found


class _Latest:
    """A heap entry ordered backwards, so that the heap's top is the largest key."""

    __slots__ = ("key",)

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key

    def __lt__(self, other: _Latest) -> bool:
        return self.key > other.key


class Selection:
    """At most `most` repository:tag pairs of a rule, the first by repository then tag
    whatever order they arrive in (repositories are listed concurrently), holding no
    more than `most` at any time."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.offered = 0
        self._heap: list[_Latest] = []

    def add(self, repository: str, tags: Iterable[str]) -> None:
        for tag in tags:
            self.offered += 1
            key = (repository, tag)
            if len(self._heap) < self.most:
                heapq.heappush(self._heap, _Latest(key))
            elif key < self._heap[0].key:
                heapq.heapreplace(self._heap, _Latest(key))

    @property
    def dropped(self) -> int:
        return self.offered - len(self._heap)

    def by_repository(self) -> dict[str, list[str]]:
        chosen: dict[str, list[str]] = {}
        for repository, tag in sorted(e.key for e in self._heap):
            chosen.setdefault(repository, []).append(tag)
        return chosen


@dataclass(frozen=True)
class Plan:
    create: list[Wanted]
    delete: list[str]
    """ImageScans of tags the registry no longer has (or the filter no longer matches)."""


def reconcile(wanted_scans: Mapping[str, Wanted], existing: Iterable[str]) -> Plan:
    """Idempotent: what exists and is wanted is left alone."""
    have = set(existing)
    return Plan(create=[w for n, w in sorted(wanted_scans.items()) if n not in have],
                delete=sorted(have - set(wanted_scans)))


class ScheduleError(ValueError):
    """A schedule that gives no time (the webhook refuses such; one stored before it did,
    or behind its back, must end up a condition on its rule, not an exception)."""


def _cron_time(schedule: str, since: datetime, forward: bool) -> datetime:
    try:
        times = croniter(schedule, since.astimezone(UTC))
        found: datetime = times.get_next(datetime) if forward else times.get_prev(datetime)
    # croniter raises CroniterBadDateError for 30 February, its own parse errors,
    # KeyError, OverflowError...: whatever it raises is about the schedule.
    except Exception as e:
        raise ScheduleError(f"cron expression {schedule!r} gives no time "
                            f"{'after' if forward else 'before'} {since:%Y-%m-%d %H:%M}: "
                            f"{type(e).__name__}") from None
    return found


def next_due(schedule: str, since: datetime) -> datetime:
    """The first scheduled time after `since`; ScheduleError when there is none."""
    return _cron_time(schedule, since, forward=True)


def schedule_due(schedule: str, last_scheduled: datetime | None, created: datetime,
                 now: datetime) -> datetime | None:
    """The scheduled time to run for now, if one has come since the last scheduled run
    (or the rule's creation): at most one run per due time, however long the operator
    was down, and none missed, since the last scheduled time is kept in the rule's
    status (as a CronJob keeps lastScheduleTime)."""
    due = next_due(schedule, last_scheduled or created)
    if due > now:
        return None
    # Several due times passed while the operator was down: one run stands for them all.
    return max(due, _cron_time(schedule, now, forward=False))


def manual_run_requested(annotation: str | None, last_acted_on: str | None) -> bool:
    """Each new value of scangate.dev/scan-now runs the rule once."""
    return bool(annotation) and annotation != last_acted_on


def trigger_of(generation: int, observed: int | None, scan_now: bool,
               schedule: datetime | None, suspended: bool) -> str | None:
    """Why a rule runs now, if it does: a manual run, its spec changed (or it is new), or
    its schedule. A suspended rule does not run at all."""
    if suspended:
        return None
    if scan_now:
        return "Manual"
    if observed is None or observed < generation:
        return "Create"
    return "Schedule" if schedule is not None else None


def matching_rules(rules: Sequence[tuple[str, str, Scope, TagFilter, bool]], host: str,
                   repository: str, tag: str) -> list[str]:
    """The rules (namespace/name) a pushed host/repository:tag falls under: same
    registry host, in scope, tag matched, push trigger on and not suspended."""
    return [ref for ref, rule_host, scope, tag_filter, on_push in rules
            if on_push and rule_host == host and scope.covers(repository)
            and tag_matches(tag_filter, tag)]


def rule_totals(scans: Iterable[ScanState]) -> tuple[int, dict[str, int]]:
    """Images (digests) with a result among a rule's scans, and their findings: each
    digest counted once, however many of the rule's tags point at it."""
    totals = dict.fromkeys((*SEVERITY_KEYS, "total"), 0)
    digests = set()
    for scan in scans:
        if scan.summary is not None and scan.digest not in digests:
            digests.add(scan.digest)
            for key, count in zip(totals, scan.summary, strict=True):
                totals[key] += count
    return len(digests), totals
