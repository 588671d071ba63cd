"""The ScanRule controller's pieces that need no API server: a rule's totals, what a
push asks for, and when a failed rule is looked at again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from scangate.api.imagescan import Phase
from scangate.core.patterns import check_tag_filter
from scangate.core.rules import ScheduleError, rule_totals, scan_name
from scangate.core.rulestate import RuleState, project_rule
from scangate.core.scanstate import ScanState
from scangate.registry.events import PushedImage
from scangate.scanning.rulepush import pushed_scans
from scangate.scanning.ruleschedule import MAX_FAILURES, MAX_RUN_BACKOFF, RuleSchedule


def _rule(name: str = "r", generation: int = 1, **spec: object) -> RuleState:
    return project_rule({
        "metadata": {"namespace": "ns", "name": name, "uid": "u", "generation": generation,
                     "resourceVersion": "1", "creationTimestamp": "2026-11-29T01:00:00Z"},
        "spec": {"registry": {"url": "https://reg.example:5000"},
                 "scope": {"namespaces": ["team-a"]}, **spec},
        "status": {"observedGeneration": generation}})


def test_totals_count_each_digest_once() -> None:
    scans = [ScanState("ns", "a", digest="sha256:1", summary=(1, 2, 0, 0, 0, 3)),
             ScanState("ns", "b", digest="sha256:1", summary=(1, 2, 0, 0, 0, 3)),
             ScanState("ns", "c", digest="sha256:2", summary=(0, 0, 1, 0, 0, 1)),
             ScanState("ns", "d", digest="sha256:3")]
    images, totals = rule_totals(scans)
    assert images == 2
    assert totals == {"critical": 1, "high": 2, "medium": 1, "low": 0, "unknown": 0,
                      "total": 4}


def test_a_push_creates_a_missing_scan_and_rescans_only_a_moved_settled_one() -> None:
    rule = _rule()
    rules = [(rule, check_tag_filter(r"v.*"))]
    name = scan_name("r", "team-a/api", "v1")
    pushed = PushedImage("reg.example:5000", "team-a/api", "v1", "sha256:new")
    created = pushed_scans([pushed], rules, {})
    assert [(p.ref, p.held) for p in created] == [(("ns", name), None)]
    settled = ScanState("ns", name, phase=Phase.COMPLETED, digest="sha256:old")
    again = pushed_scans([pushed], rules, {("ns", name): settled})
    assert [p.held for p in again] == [settled]
    same = ScanState("ns", name, phase=Phase.COMPLETED, digest="sha256:new")
    running = ScanState("ns", name, phase=Phase.SCANNING, digest="sha256:old")
    for held in (same, running):
        assert pushed_scans([pushed], rules, {("ns", name): held}) == []
    # Not covered: another host, another namespace, a tag the filter refuses, no tag.
    for image in (PushedImage("other:5000", "team-a/api", "v1", None),
                  PushedImage("reg.example:5000", "team-b/api", "v1", None),
                  PushedImage("reg.example:5000", "team-a/api", "latest", None),
                  PushedImage("reg.example:5000", "team-a/api", None, "sha256:x")):
        assert pushed_scans([image], rules, {}) == []


def test_a_suspended_rule_or_one_without_push_trigger_takes_no_push() -> None:
    pushed = PushedImage("reg.example:5000", "team-a/api", "v1", None)
    for rule in (_rule(suspend=True), _rule(triggers={"onPush": False})):
        rules = [(rule, check_tag_filter(".*"))]
        assert pushed_scans([pushed], rules, {}) == []


def test_a_failing_rule_backs_off_doubling_then_waits_for_a_change() -> None:
    schedule = RuleSchedule(timedelta(seconds=10))
    rule = _rule()
    waits = []
    for _ in range(MAX_FAILURES):
        before = datetime.now(UTC)
        reason, message = schedule.failed(rule, RuntimeError("boom"))
        assert reason == "ReconcileFailed" and "RuntimeError: boom" in message
        failure = schedule._failures[rule.ref]
        waits.append(None if failure.at is None else round((failure.at - before)
                                                           .total_seconds()))
    assert waits == [10, 20, 40, 80, None]
    assert schedule.held_back(rule, datetime.now(UTC) + MAX_RUN_BACKOFF)
    # A new spec: a fresh start.
    assert not schedule.held_back(_rule(generation=2), datetime.now(UTC))


def test_a_schedule_with_no_time_is_not_retried() -> None:
    schedule = RuleSchedule(timedelta(seconds=10))
    rule = _rule()
    reason, message = schedule.failed(rule, ScheduleError("no time"))
    assert reason == "InvalidSchedule" and message.endswith(
        "left alone until its spec or scangate.dev/scan-now changes")
    assert schedule.pop_due(datetime.now(UTC) + timedelta(days=1)) == set()
