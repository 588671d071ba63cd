"""The scan queue planner: limits, order, dedupe by digest, reuse, retries, rescans."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from scangate.core.queue import Requeue, Reuse, ScanView, Start, plan, scan_key

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
DAY = timedelta(hours=24)


def queued(name: str, digest: str, minute: int, **kw: object) -> ScanView:
    return ScanView("ns", name, "Queued", scan_key(digest, ["vuln"], False),
                    queued_at=NOW - timedelta(minutes=60 - minute), **kw)  # type: ignore[arg-type]


def test_starts_in_queue_order_up_to_the_limit_of_running_jobs() -> None:
    scans = [queued(f"s{i}", f"sha256:{i}", i) for i in range(6)]
    actions = plan(list(reversed(scans)), running_jobs=1, limit=3, now=NOW, rescan_interval=DAY)
    assert [a.scan.name for a in actions] == ["s0", "s1"]
    assert all(isinstance(a, Start) for a in actions)
    assert plan(scans, running_jobs=3, limit=3, now=NOW, rescan_interval=DAY) == []


def test_one_job_per_digest_and_the_rest_wait_then_reuse() -> None:
    scans = [queued(f"s{i}", f"sha256:{i % 3}", i) for i in range(10)]
    actions = plan(scans, 0, 5, NOW, DAY)
    assert sorted(a.scan.name for a in actions) == ["s0", "s1", "s2"]

    done = ScanView("ns", "s0", "Completed", scan_key("sha256:0", ["vuln"], False),
                    scanned_at=NOW - timedelta(minutes=1), has_result=True)
    scanning = [ScanView("ns", f"s{i}", "Scanning", scan_key(f"sha256:{i}", ["vuln"], False))
                for i in (1, 2)]
    actions = plan([done, *scanning, *scans[3:]], 0, 5, NOW, DAY)
    reused = [a for a in actions if isinstance(a, Reuse)]
    assert sorted(a.scan.name for a in reused) == ["s3", "s6", "s9"]
    assert all(a.source.name == "s0" for a in reused)
    assert not any(isinstance(a, Start) for a in actions)


def test_different_options_do_not_share_results() -> None:
    done = ScanView("ns", "a", "Completed", scan_key("sha256:1", ["vuln"], False),
                    scanned_at=NOW, has_result=True)
    other = ScanView("ns", "b", "Queued", scan_key("sha256:1", ["vuln"], True), queued_at=NOW)
    assert plan([done, other], 0, 1, NOW, DAY) == [Start(other)]


def test_stale_results_are_requeued_and_not_reused() -> None:
    stale = ScanView("ns", "old", "Completed", scan_key("sha256:1", ["vuln"], False),
                     scanned_at=NOW - 2 * DAY, has_result=True)
    new = queued("new", "sha256:1", 1)
    actions = plan([stale, new], 0, 1, NOW, DAY)
    assert Requeue(stale) in actions and Start(new) in actions


def test_retry_waits_for_its_time() -> None:
    later = queued("r", "sha256:1", 1, retry_after=NOW + timedelta(seconds=30))
    assert plan([later], 0, 1, NOW, DAY) == []
    assert plan([later], 0, 1, NOW + timedelta(minutes=1), DAY) == [Start(later)]


def test_unresolved_scans_are_not_planned() -> None:
    pending = ScanView("ns", "p", "Pending", None)
    assert plan([pending], 0, 5, NOW, DAY) == []
