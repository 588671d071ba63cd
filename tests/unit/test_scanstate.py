"""The in-memory scan state: projections, incremental indexes and the queue plan."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from scangate.api.imagescan import Phase
from scangate.core.scanstate import (
    JobState,
    Newest,
    PodState,
    Requeue,
    Reuse,
    ScanIndex,
    ScanState,
    Start,
    project_job,
    project_pod,
    project_scan,
    scan_key,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
DAY = timedelta(hours=24)


def scan(name: str, phase: str | None = "Queued", digest: str | None = "sha256:1",
         minute: int = 0, version: int = 1, **kw: Any) -> ScanState:
    return ScanState("ns", name, uid=f"uid-{name}", version=version, image=f"r/{name}:1",
                     phase=phase, digest=digest,
                     queued_at=NOW - timedelta(minutes=60 - minute), **kw)


def done(name: str, digest: str = "sha256:1", age: timedelta = timedelta(hours=1),
         **kw: Any) -> ScanState:
    return scan(name, "Completed", digest, scanned_at=NOW - age,
                result_key=scan_key(digest, ["vuln"], False),
                summary=(1, 2, 3, 4, 0, 10), **kw)


def job(name: str, scan_name: str, **kw: Any) -> JobState:
    """A scan Job as the operator creates it for the scan `scan_name` of `scan`."""
    return JobState(name, ("ns", scan_name), scan_uid=f"uid-{scan_name}", **kw)


def index(*states: ScanState) -> ScanIndex:
    idx = ScanIndex(DAY)
    for s in states:
        idx.upsert_scan(s)
    return idx


def test_starts_in_queue_order_up_to_the_limit_of_running_jobs() -> None:
    idx = index(*(scan(f"s{i}", digest=f"sha256:{i}", minute=i) for i in reversed(range(6))))
    idx.upsert_job(job("running", "x"))
    actions = idx.plan(NOW, limit=3)
    assert [a.scan.name for a in actions] == ["s0", "s1"]
    assert all(isinstance(a, Start) for a in actions)
    idx.upsert_job(job("running2", "y"))
    idx.upsert_job(job("running3", "z"))
    assert idx.plan(NOW, limit=3) == []


def test_finished_jobs_free_their_slot() -> None:
    idx = index(scan("a"))
    idx.upsert_job(job("j", "x"))
    assert idx.plan(NOW, limit=1) == []
    idx.upsert_job(job("j", "x", version=2, finished="Complete"))
    assert [a.scan.name for a in idx.plan(NOW, limit=1)] == ["a"]
    idx.delete_job("j")
    assert idx.running_jobs == 0


def test_one_job_per_digest_and_the_rest_wait_then_reuse() -> None:
    idx = index(*(scan(f"s{i}", digest=f"sha256:{i % 3}", minute=i) for i in range(10)))
    assert sorted(a.scan.name for a in idx.plan(NOW, 5)) == ["s0", "s1", "s2"]
    # s0 is scanning: the other queued scans of sha256:0 wait for it.
    idx.upsert_scan(replace(idx.scans[("ns", "s0")], phase="Scanning", version=2))
    assert "s3" not in {a.scan.name for a in idx.plan(NOW, 5)}
    # s0 completes: the rest of its digest reuse its result, without a Job.
    idx.upsert_scan(replace(done("s0", "sha256:0", timedelta(0)), version=3))
    reused = {a.scan.name: a.source.name for a in idx.plan(NOW, 0) if isinstance(a, Reuse)}
    assert reused == {"s3": "s0", "s6": "s0", "s9": "s0"}


def test_results_are_reused_only_for_the_options_they_were_made_with() -> None:
    made_with_unfixed_ignored = replace(
        done("a"), ignore_unfixed=True, result_key=scan_key("sha256:1", ["vuln"], True))
    other = scan("b")
    idx = index(made_with_unfixed_ignored, other)
    assert idx.plan(NOW, 1) == [Start(other)]


def test_stale_results_are_requeued_once() -> None:
    stale = done("old", age=timedelta(hours=25))
    idx = index(stale)
    assert idx.plan(NOW, 1) == [Requeue(stale)]
    assert idx.plan(NOW, 1) == []  # popped: not requeued again every pass
    idx.requeue_at(stale, NOW + timedelta(seconds=10))  # the write failed: try again later
    assert idx.plan(NOW, 1) == []
    assert idx.plan(NOW + timedelta(seconds=10), 1) == [Requeue(stale)]


def test_a_fresh_result_is_not_requeued_before_its_time() -> None:
    fresh = done("new", age=timedelta(hours=23))
    idx = index(fresh)
    assert idx.plan(NOW, 1) == []
    assert idx.plan(NOW + timedelta(hours=2), 1) == [Requeue(fresh)]


OLD_DB, NEW_DB = NOW - 2 * DAY, NOW - timedelta(hours=6)


def test_a_new_db_requeues_every_result_made_with_an_older_one_running_first() -> None:
    results = [done(f"r{i}", f"sha256:{i}", db_updated_at=OLD_DB) for i in range(4)]
    current = done("current", "sha256:9", db_updated_at=NEW_DB)
    unsaid = done("unsaid", "sha256:8")  # made before results said their DB
    idx = index(*results, current, unsaid)
    assert idx.plan(NOW, 1) == []
    assert idx.new_db(NEW_DB, NOW)
    assert idx.requeue_older(first=["sha256:2", "sha256:3"]) == 4
    requeued = [a.scan.name for a in idx.plan(NOW, 1)]
    assert all(isinstance(a, Requeue) for a in idx.plan(NOW, 1)) and len(requeued) == 4
    assert set(requeued[:2]) == {"r2", "r3"} and set(requeued[2:]) == {"r0", "r1"}
    # The same DB again (the next poll) is no news.
    assert not idx.new_db(NEW_DB, NOW)
    assert idx.plan(NOW, 1) == []


def test_a_db_rolled_back_rescans_nothing_and_results_of_the_newer_one_are_not_reused() -> None:
    idx = index(done("newer", db_updated_at=NEW_DB, age=timedelta(minutes=5)))
    idx.new_db(NEW_DB, NOW)
    assert idx.new_db(OLD_DB, NOW) and idx.requeue_older() == 0 and idx.plan(NOW, 1) == []
    asking = scan("asking")
    idx.upsert_scan(asking)
    assert idx.plan(NOW, 1) == [Start(asking)]


def test_a_result_made_with_an_older_db_is_not_reused() -> None:
    old = done("old", db_updated_at=OLD_DB, age=timedelta(minutes=5))
    idx = index(old)
    idx.new_db(NEW_DB, NOW)
    asking = scan("asking")
    idx.upsert_scan(asking)
    actions = idx.plan(NOW, 1)
    assert Start(asking) in actions and not any(isinstance(a, Reuse) for a in actions)
    # Once a result of the new DB is in, it is reused.
    idx.upsert_scan(done("new", db_updated_at=NEW_DB, age=timedelta(0)))
    assert Reuse(asking, idx.scans[("ns", "new")]) in idx.plan(NOW, 0)


def test_a_result_of_an_old_db_seen_after_the_new_db_is_known_is_requeued() -> None:
    """A restarted operator may learn of the DB before it has listed every result."""
    idx = index()
    idx.new_db(NEW_DB, NOW - timedelta(minutes=10))
    listed = done("listed", db_updated_at=OLD_DB, age=timedelta(minutes=15))
    idx.upsert_scan(listed)
    assert idx.plan(NOW, 1) == [Requeue(listed)]


def test_a_result_made_with_an_older_db_after_the_new_one_was_known_waits() -> None:
    """Its scanner had not loaded the new DB yet (another server replica): rescanned
    later, not in a loop."""
    idx = index()
    idx.new_db(NEW_DB, NOW - timedelta(minutes=10))
    lagging = done("lagging", db_updated_at=OLD_DB, age=timedelta(minutes=1))
    idx.upsert_scan(lagging)
    assert idx.plan(NOW, 1) == []
    assert idx.plan(NOW + timedelta(minutes=9), 1) == [Requeue(lagging)]


def test_retry_after_holds_a_queued_scan_back() -> None:
    later = scan("later", retry_after=NOW + timedelta(minutes=1))
    idx = index(later)
    assert idx.plan(NOW, 1) == []
    assert idx.plan(NOW + timedelta(minutes=1), 1) == [Start(later)]


def test_pending_scans_are_due_after_their_retry_time() -> None:
    now_due, later = scan("p", "Pending", None), scan("q", "Pending", None,
                                                     retry_after=NOW + timedelta(minutes=1))
    idx = index(now_due, later)
    assert idx.due_pending(NOW) == [now_due]
    assert idx.plan(NOW, 5) == []


def test_older_events_and_own_writes_coming_back_change_nothing() -> None:
    idx = index(scan("a", version=5))
    assert not idx.upsert_scan(scan("a", "Completed", version=4))
    assert idx.scans[("ns", "a")].phase == "Queued"
    assert not idx.upsert_scan(scan("a", version=6))  # same projection, newer version
    assert idx.scans[("ns", "a")].version == 6
    assert idx.upsert_scan(scan("a", "Scanning", version=7))


def test_the_event_of_the_version_held_does_not_undo_a_claim() -> None:
    """The operator claims a queued scan (Scanning, same version) before its Job exists;
    the watch then delivers that very version, still Queued: the claim must stand, or a
    second scan of the same digest would start."""
    idx = index(scan("a", version=5), scan("b", version=5, minute=1))
    assert [a.scan.name for a in idx.plan(NOW, 5)] == ["a"]
    idx.upsert_scan(replace(idx.scans[("ns", "a")], phase="Scanning"), claim=True)
    assert not idx.upsert_scan(scan("a", version=5))
    assert idx.scans[("ns", "a")].phase == "Scanning"
    assert idx.plan(NOW, 5) == []
    assert idx.upsert_scan(scan("a", "Scanning", version=6))  # the API's own word
    assert not idx.scans[("ns", "a")].claimed


def test_relist_drops_what_was_deleted_meanwhile_and_fixes_the_indexes() -> None:
    idx = index(done("gone", digest="sha256:9"), scan("kept"))
    idx.replace_scans([scan("kept", version=2)])
    assert list(idx.scans) == [("ns", "kept")]
    assert idx.by_digest("sha256:9") == []
    assert "ns" not in idx.totals


def test_totals_by_namespace_follow_each_change() -> None:
    idx = index(done("a"), done("b"))
    assert idx.totals["ns"] == [2, 4, 6, 8, 0, 20]
    idx.upsert_scan(replace(done("a"), summary=(0, 0, 0, 1, 0, 1), version=2))
    assert idx.totals["ns"] == [1, 2, 3, 5, 0, 11]
    idx.delete_scan(("ns", "b"))
    assert idx.totals["ns"] == [0, 0, 0, 1, 0, 1]


def test_collectable_and_orphaned_scans() -> None:
    running = scan("run", "Scanning", job_name="j1", start_time=NOW - timedelta(minutes=5))
    finished = scan("fin", "Scanning", job_name="j2", start_time=NOW - timedelta(minutes=5))
    lost = scan("lost", "Scanning", job_name="j3", start_time=NOW - timedelta(minutes=5))
    young = scan("young", "Scanning", job_name="j4", start_time=NOW - timedelta(seconds=5))
    idx = index(running, finished, lost, young)
    idx.upsert_job(job("j1", "run"))
    idx.upsert_job(job("j2", "fin", finished="Failed", deadline_exceeded=True))
    assert [(s.name, j.name) for s, j in idx.collectable()] == [("fin", "j2")]
    assert [s.name for s in idx.orphaned(NOW, timedelta(minutes=1))] == ["lost"]


def test_a_scan_is_collectable_once_its_pod_succeeded_before_its_job_completes() -> None:
    started = NOW - timedelta(minutes=5)
    idx = index(scan("a", "Scanning", job_name="ja", start_time=started),
                scan("b", "Scanning", job_name="jb", start_time=started))
    idx.upsert_job(job("ja", "a", uid="job-a"))
    idx.upsert_job(job("jb", "b", uid="job-b"))
    assert idx.upsert_pod(PodState("ja-x1", job="ja", job_uid="job-a")) is False  # running
    assert idx.collectable() == []
    assert idx.upsert_pod(PodState("ja-x1", job="ja", job_uid="job-a", succeeded=True))
    assert [(s.name, j.name, j.finished, j.uid) for s, j in idx.collectable()] == [
        ("a", "ja", "Complete", "job-a")]
    assert idx.running_jobs == 2  # a Job holds its slot until it is marked complete
    # A pod of the next attempt's Job says nothing of this one; a deleted pod is forgotten.
    idx.upsert_pod(PodState("jb-x1", job="jb-2", job_uid="job-b2", succeeded=True))
    assert [s.name for s, _ in idx.collectable()] == ["a"]
    idx.delete_pod(PodState("ja-x1", job="ja", succeeded=True))
    assert idx.collectable() == []
    idx.replace_pods([PodState("jb-x2", job="jb", job_uid="job-b", succeeded=True)])
    assert [s.name for s, _ in idx.collectable()] == ["b"]


def test_only_the_job_created_for_the_attempt_is_collected() -> None:
    # A Job that took the name (another scan's labels, another uid than the one recorded
    # when scangate created it) is never read, however finished it is; after the grace
    # period the scan counts as having lost its Job and is tried again under a new name.
    started = NOW - timedelta(minutes=5)
    mine = scan("a", "Scanning", job_name="ja", job_uid="job-a", start_time=started)
    idx = index(mine)
    idx.upsert_job(job("ja", "a", uid="someone-else", finished="Complete"))
    assert idx.collectable() == []
    idx.upsert_pod(PodState("ja-x", job="ja", job_uid="someone-else", succeeded=True))
    assert idx.collectable() == []
    assert idx.orphaned(NOW, timedelta(minutes=1)) == [mine]
    # Labels naming another scan (or another uid of this one) are no better.
    idx.upsert_job(JobState("ja", ("ns", "a"), scan_uid="uid-other", uid="job-a", version=3,
                            finished="Complete"))
    assert idx.collectable() == []
    idx.upsert_job(job("ja", "a", uid="job-a", version=4, finished="Complete"))
    assert [j.uid for _, j in idx.collectable()] == ["job-a"]
    # A succeeded pod counts only if the Job recorded for the scan controls it.
    idx.upsert_job(job("ja", "a", uid="job-a", version=5))
    idx.replace_pods([PodState("ja-y", job="ja", job_uid="forged", succeeded=True)])
    assert idx.collectable() == []


def test_jobs_of_deleted_scans_are_orphans_to_delete() -> None:
    grace = timedelta(minutes=1)
    idx = index(scan("a", "Scanning", job_name="ja", start_time=NOW),
                scan("b", "Scanning", job_name="jb", start_time=NOW))
    idx.upsert_job(job("ja", "a"))
    idx.upsert_job(job("jb", "b"))
    assert idx.orphan_jobs(NOW, grace) == []
    idx.delete_scan(("ns", "a"))  # deleted: its Job goes at once
    assert idx.orphan_jobs(NOW, grace) == ["ja"]
    assert idx.orphan_jobs(NOW, grace) == ["ja"]  # until its deletion is seen
    idx.delete_job("ja")
    assert idx.orphan_jobs(NOW, grace) == []
    # A Job whose scan is not held (yet: watches may lag) waits out the grace period.
    idx.upsert_job(job("jx", "unknown"))
    assert idx.orphan_jobs(NOW, grace) == []
    assert idx.orphan_jobs(NOW + grace / 2, grace) == []
    idx.upsert_scan(scan("unknown"))  # its scan arrived: no orphan
    assert idx.orphan_jobs(NOW + 2 * grace, grace) == []
    idx.upsert_job(job("jy", "gone-before-start"))
    idx.orphan_jobs(NOW, grace)
    assert idx.orphan_jobs(NOW + 2 * grace, grace) == ["jy"]
    # A scan recreated under the same name is another scan: the old uid's Job is orphaned.
    idx.upsert_job(job("jb2", "b"))
    idx.delete_scan(("ns", "b"))
    idx.upsert_scan(replace(scan("b"), uid="uid-b-new"))
    assert sorted(idx.orphan_jobs(NOW + 2 * grace, grace)) == ["jb", "jb2", "jy"]


def test_pod_projection_names_its_job_and_success() -> None:
    pod = {"metadata": {"namespace": "ns", "name": "j-x", "ownerReferences": [
        {"kind": "Job", "name": "j", "uid": "u", "controller": True}]},
        "status": {"phase": "Succeeded"}}
    assert project_pod(pod) == PodState("j-x", job="j", job_uid="u", succeeded=True)
    assert project_pod({"metadata": {"name": "p"}, "status": {"phase": "Running"}}) == \
        PodState("p", job="")


def test_by_digest_finds_every_scan_of_a_digest() -> None:
    idx = index(done("a", "sha256:x"), scan("b", digest="sha256:x"), scan("c", digest="sha256:y"))
    assert sorted(s.name for s in idx.by_digest("sha256:x")) == ["a", "b"]


def test_in_phase_and_newest_vulnerabilities_follow_each_change() -> None:
    idx = index(done("old", "sha256:x", age=2 * DAY), done("new", "sha256:x"),
                done("secrets", "sha256:x", age=timedelta(0), scanners=("secret",)),
                scan("q", digest="sha256:x"), scan("f", "Failed", digest="sha256:x"))
    newest = idx.newest_vulnerabilities("sha256:x")
    assert newest is not None and newest.name == "new"
    queued = idx.in_phase("sha256:x", ("Scanning", "Queued"))
    assert queued is not None and queued.name == "q"
    assert idx.in_phase("sha256:x", ("Pending",)) is None
    idx.delete_scan(("ns", "new"))
    newest = idx.newest_vulnerabilities("sha256:x")
    assert newest is not None and newest.name == "old"
    idx.upsert_scan(scan("old", "Scanning", digest="sha256:x", version=3))
    idx.upsert_scan(scan("q", "Scanning", digest="sha256:x", version=3))
    assert idx.newest_vulnerabilities("sha256:x") is None
    assert idx.in_phase("sha256:x", ("Queued",)) is None
    assert idx.by_digest("sha256:y") == [] and idx.in_phase("sha256:y", ("Failed",)) is None


def test_newest_is_kept_as_times_come_and_go() -> None:
    newest = Newest()
    assert newest.newest() is None
    times = {("ns", str(i)): NOW + timedelta(minutes=(i * 7) % 10) for i in range(10)}
    for ref, when in times.items():
        newest.add(ref, when)
    while times:
        top = max(times.values())
        held = newest.newest()
        assert held is not None and held[1] == top and times[held[0]] == top
        # Move one scan back in time, remove the newest: each must be noticed.
        first = next(iter(times))
        times[first] -= timedelta(hours=1)
        newest.add(first, times[first])
        held = newest.newest()
        assert held is not None and held[1] == max(times.values())
        del times[held[0]]
        newest.remove(held[0])
    assert newest.newest() is None


def test_projection_keeps_what_is_needed_read_through_the_api_type() -> None:
    obj = {
        "metadata": {"namespace": "ns", "name": "a", "uid": "u", "generation": 2,
                     "resourceVersion": "42", "creationTimestamp": "2026-11-28T11:00:00Z"},
        "spec": {"image": "r/a:1", "scanners": ["vuln", "secret"], "ignoreUnfixed": True,
                 "ruleRef": {"name": "rule"}, "platform": "linux/arm64"},
        "status": {"phase": "Completed", "digest": "sha256:1", "scannedAt": "2026-11-28T11:30:00Z",
                   "summary": {"critical": 1, "high": 2, "medium": 3, "low": 4, "unknown": 5,
                               "total": 15},
                   "scannedWith": {"scanners": ["vuln"], "ignoreUnfixed": False,
                                   "dbUpdatedAt": "2026-11-28T06:00:00Z"},
                   "conditions": [{"type": "Ready", "status": "True",
                                   "lastTransitionTime": "2026-11-28T11:30:00Z"}],
                   "findings": [{"id": "CVE-1"}] * 100},
    }
    s = project_scan(obj)
    assert (s.version, s.rule, s.platform, s.summary) == (42, "rule", "linux/arm64",
                                                          (1, 2, 3, 4, 5, 15))
    assert s.key == scan_key("sha256:1", ["secret", "vuln"], True)
    assert s.result_key == scan_key("sha256:1", ["vuln"], False)  # what the result was made with
    assert s.ready == ("True", "2026-11-28T11:30:00Z")
    assert s.db_updated_at == datetime(2026, 11, 28, 6, tzinfo=UTC)
    assert not hasattr(s, "findings")
    # Read through the API type: what it cannot read is refused, naming the field (the
    # cache leaves the object out and counts it).
    junk = {"metadata": {"name": "b", "resourceVersion": "x"}, "spec": {"image": "r/b:1"},
            "status": {"summary": "many", "queuedAt": "yesterday", "attempts": "3"}}
    with pytest.raises(ValidationError) as refused:
        project_scan(junk)
    assert {str(e["loc"][-1]) for e in refused.value.errors()} == {"summary", "queuedAt"}
    del junk["status"]["summary"], junk["status"]["queuedAt"]
    assert (project_scan(junk).version, project_scan(junk).attempts) == (-1, 3)


def test_job_projection_from_labels_and_conditions() -> None:
    job = project_job({
        "metadata": {"namespace": "scangate-system", "name": "j", "resourceVersion": "7",
                     "uid": "job-uid",
                     "labels": {"scangate.dev/imagescan-namespace": "ns",
                                "scangate.dev/imagescan-uid": "scan-uid"},
                     "annotations": {"scangate.dev/imagescan": "ns/a"}},
        "status": {"conditions": [{"type": "Failed", "status": "True",
                                   "reason": "DeadlineExceeded"}]}})
    assert (job.scan, job.scan_uid, job.uid, job.finished, job.deadline_exceeded,
            job.version) == (("ns", "a"), "scan-uid", "job-uid", "Failed", True, 7)
    # An annotation naming a scan in another namespace than the label names nothing.
    odd = project_job({"metadata": {"name": "j", "labels": {
        "scangate.dev/imagescan-namespace": "ns"}, "annotations": {
        "scangate.dev/imagescan": "other/a"}}})
    assert odd.scan == ("ns", "")


def test_editing_the_options_of_a_completed_scan_rescans_it() -> None:
    edited = replace(done("a"), ignore_unfixed=True)  # result made with ignoreUnfixed false
    idx = index(edited)
    assert idx.plan(NOW, 1) == [Requeue(edited)]


def test_a_deleted_job_orphans_its_scan_at_once() -> None:
    s = scan("a", "Scanning", job_name="j", start_time=NOW)
    idx = index(s)
    idx.upsert_job(job("j", "a"))
    assert idx.orphaned(NOW, timedelta(minutes=1)) == []
    idx.delete_job("j")
    assert idx.orphaned(NOW, timedelta(minutes=1)) == [s]
    idx.upsert_scan(replace(s, phase="Queued", version=2))  # requeued: no longer lost
    assert idx.orphaned(NOW, timedelta(minutes=1)) == []


def test_scans_by_rule_follow_changes() -> None:
    idx = index(scan("a", owner="r"), scan("b", owner="r"), scan("c", owner="other"),
                scan("mine", rule="r"))  # a user's scan naming the rule is not the rule's
    assert sorted(s.name for s in idx.by_rule("ns", "r")) == ["a", "b"]
    idx.delete_scan(("ns", "a"))
    assert [s.name for s in idx.by_rule("ns", "r")] == ["b"]
    assert idx.by_rule("ns", "none") == []


def test_an_expected_job_never_hides_the_one_already_held() -> None:
    # A replica died after creating the Job and before recording it in the scan: the
    # next leader computes the same name, and the finished Job must stay collectable.
    idx = index(scan("a"))
    idx.upsert_job(job("j", "a", version=7, finished="Complete"))
    idx.expect_job(job("j", "a"))
    idx.upsert_scan(replace(scan("a"), phase="Scanning", job_name="j", start_time=NOW),
                    claim=True)
    assert [(s.name, j.version) for s, j in idx.collectable()] == [("a", 7)]
    idx.expect_job(job("k", "b"))
    assert idx.jobs["k"].version == -1 and idx.running_jobs == 1


def test_a_deleted_scan_is_not_revived_by_a_write_answered_after_its_deletion() -> None:
    # A status write races the DELETED event: its answer must not bring back a result
    # that can no longer be read, or every later scan of the digest would wait on it.
    idx = index(done("a"))
    idx.delete_scan(("ns", "a"))
    assert not idx.upsert_scan(done("a", version=5))
    assert idx.scans == {} and idx.fresh_result(scan_key("sha256:1", ["vuln"], False), NOW) is None
    queued = scan("b", version=1)
    idx.upsert_scan(queued)
    assert [type(a).__name__ for a in idx.plan(NOW, limit=1)] == ["Start"]
    # A new object of the same name is another UID, and is held.
    assert idx.upsert_scan(replace(done("a"), uid="uid-a-2"))


def test_two_outcomes_in_one_second_of_different_digests_are_different_events() -> None:
    first = done("a", "sha256:1", age=timedelta(0), completion_time=NOW)
    moved = replace(first, digest="sha256:2")
    assert first.event_key and moved.event_key and first.event_key != moved.event_key
    assert first.event_key == replace(first, version=9).event_key  # the same across restarts
    assert scan("q").event_key is None


def test_a_result_answers_for_its_manifest_and_for_the_index_it_was_chosen_from() -> None:
    # A Pod may name a multi-arch image by its index's digest: that is the same image as
    # its tag, judged by the same result (it used to be unscanned for ever).
    by_tag = replace(done("tag", digest="sha256:amd64"), index_digest="sha256:index")
    idx = index(by_tag)
    assert idx.newest_vulnerabilities("sha256:index") == by_tag
    assert idx.newest_vulnerabilities("sha256:amd64") == by_tag
    scanning = replace(scan("pinned", "Scanning", digest="sha256:amd64"),
                       index_digest="sha256:index")
    idx.upsert_scan(scanning)
    assert idx.in_phase("sha256:index", ("Scanning",)) == scanning
    idx.delete_scan(("ns", "tag"))
    assert idx.newest_vulnerabilities("sha256:index") is None
    assert project_scan({"metadata": {"name": "x"}, "spec": {"image": "r/x:1"}, "status": {
        "digest": "sha256:amd64", "indexDigest": "sha256:index"}}).digests == (
        "sha256:amd64", "sha256:index")


def test_a_scan_pod_killed_at_its_memory_limit_is_told_apart_until_it_goes() -> None:
    pod: dict[str, Any] = {"metadata": {"name": "ja-x1", "ownerReferences": [
        {"kind": "Job", "name": "ja", "uid": "job-a", "controller": True}]},
        "status": {"phase": "Failed", "containerStatuses": [{"name": "trivy", "state": {
            "terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}
    killed = project_pod(pod)
    assert killed.oom_killed and not killed.succeeded
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] = "Error"
    assert not project_pod(pod).oom_killed
    idx = index(scan("a", "Scanning", job_name="ja"))
    assert not idx.oom_killed("ja", "job-a")
    idx.upsert_pod(killed)
    assert idx.oom_killed("ja", "job-a")
    assert not idx.oom_killed("ja", "another-job-of-that-name")
    idx.delete_pod(killed)  # the last state of a deleted pod is the killed one
    assert not idx.oom_killed("ja", "job-a")
    idx.replace_pods([killed])
    assert idx.oom_killed("ja", "job-a")
    idx.replace_pods([])
    assert not idx.oom_killed("ja", "job-a")


def test_a_rescan_request_is_acted_on_once_the_scan_settles() -> None:
    def scan(phase: str, request: str | None, answered: str | None,
             version: int) -> dict[str, Any]:
        return {"metadata": {"namespace": "ns", "name": "s", "uid": "u",
                             "resourceVersion": str(version)},
                "spec": {"image": "reg/app:1"},
                "status": {"phase": phase, "digest": "sha256:1", "rescanRequest": request,
                           "rescanAnswered": answered}}

    index = ScanIndex(timedelta(hours=1))
    index.upsert_scan(project_scan(scan(Phase.SCANNING, "pushed (t1)", None, 1)))
    assert index.rescans_requested() == []  # in flight: asked when it settles
    index.upsert_scan(project_scan(scan(Phase.COMPLETED, "pushed (t1)", None, 2)))
    assert [s.name for s in index.rescans_requested()] == ["s"]
    index.upsert_scan(project_scan(scan(Phase.PENDING, "pushed (t1)", "pushed (t1)", 3)))
    index.upsert_scan(project_scan(scan(Phase.COMPLETED, "pushed (t1)", "pushed (t1)", 4)))
    assert index.rescans_requested() == []  # answered
    index.upsert_scan(project_scan(scan(Phase.FAILED, "moved (t2)", "pushed (t1)", 5)))
    assert [s.rescan_request for s in index.rescans_requested()] == ["moved (t2)"]
    index.delete_scan(("ns", "s"))
    assert index.rescans_requested() == []
