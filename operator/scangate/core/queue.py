"""The scan queue: which queued ImageScans to start, to answer from a fresh result, or to wait.

The queue is the set of Queued ImageScans in the cluster, so an operator restart
loses nothing. One digest is scanned once per freshness window: a queued scan
whose digest (with the same scan options) has a fresh result reuses it, and one
whose digest is being scanned waits for that scan instead of starting another.
Only *running* Jobs count against the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class ScanView:
    """What the planner needs to know of one ImageScan."""

    namespace: str
    name: str
    phase: str | None
    key: str | None
    """Digest plus scan options; None until the digest is resolved."""
    queued_at: datetime | None = None
    scanned_at: datetime | None = None
    retry_after: datetime | None = None
    has_result: bool = False

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Start:
    scan: ScanView


@dataclass(frozen=True)
class Reuse:
    scan: ScanView
    source: ScanView


@dataclass(frozen=True)
class Requeue:
    """A completed result has gone stale: scan again."""

    scan: ScanView


Action = Start | Reuse | Requeue


def scan_key(digest: str, scanners: list[str] | tuple[str, ...], ignore_unfixed: bool) -> str:
    return f"{digest}|{','.join(sorted(scanners))}|{'unfixed-ignored' if ignore_unfixed else 'all'}"


def plan(
    scans: list[ScanView],
    running_jobs: int,
    limit: int,
    now: datetime,
    rescan_interval: timedelta,
) -> list[Action]:
    fresh: dict[str, ScanView] = {}
    in_flight: set[str] = set()
    actions: list[Action] = []
    for s in scans:
        if s.key is None:
            continue
        if s.phase == "Completed" and s.has_result and s.scanned_at is not None:
            if now - s.scanned_at < rescan_interval:
                best = fresh.get(s.key)
                if best is None or (best.scanned_at or now) < s.scanned_at:
                    fresh[s.key] = s
            else:
                actions.append(Requeue(s))
        elif s.phase == "Scanning":
            in_flight.add(s.key)

    slots = max(0, limit - running_jobs)
    queued = [s for s in scans if s.phase == "Queued" and s.key is not None]
    queued.sort(key=lambda s: (s.queued_at or now, s.namespace, s.name))
    for s in queued:
        assert s.key is not None
        if s.key in fresh:
            actions.append(Reuse(s, fresh[s.key]))
        elif s.key in in_flight or (s.retry_after is not None and s.retry_after > now):
            continue
        elif slots > 0:
            actions.append(Start(s))
            in_flight.add(s.key)
            slots -= 1
    return actions
