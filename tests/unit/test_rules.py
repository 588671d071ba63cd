"""ScanRule decisions: scope, tag filter, ImageScan names, idempotent plans, triggers."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from scangate.core.patterns import check_tag_filter
from scangate.core.rules import (
    ScheduleError,
    Scope,
    manual_run_requested,
    matching_rules,
    reconcile,
    scan_name,
    schedule_due,
    trigger_of,
    wanted,
)

SEMVER = check_tag_filter(r"v\d+\.\d+\.\d+")
T0 = datetime(2026, 11, 29, 2, 0, tzinfo=UTC)


def test_scope_covers_namespaces_and_listed_repositories() -> None:
    team_a = Scope(("team-a",))
    assert team_a.covers("team-a/api") and team_a.covers("team-a/sub/api")
    assert not team_a.covers("team-ab/api") and not team_a.covers("team-b/api")
    assert not team_a.covers("team-a")
    listed = Scope(("team-a",), ("api", "web"))
    assert listed.covers("team-a/web") and not listed.covers("team-a/db")
    assert listed.listed() == ["team-a/api", "team-a/web"] and team_a.listed() is None


def test_wanted_keeps_whole_matches_only() -> None:
    found = wanted("rule", {"team-a/api": ["v1.2.3", "v1.2.3-rc1", "latest", "v10.0.0"],
                            "team-a/web": ["xv1.0.0", "v2.0.0"]}, SEMVER)
    assert sorted((w.repository, w.tag) for w in found.values()) == [
        ("team-a/api", "v1.2.3"), ("team-a/api", "v10.0.0"), ("team-a/web", "v2.0.0")]
    assert next(iter(found.values())).image("r.example:5000").startswith("r.example:5000/team-a/")


def test_scan_names_are_valid_stable_and_distinct() -> None:
    name = scan_name("Release", "team-a/api_v2", "V1.2.3+build")
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name)
    assert name == scan_name("Release", "team-a/api_v2", "V1.2.3+build")
    assert scan_name("r", "a/b-c", "t") != scan_name("r", "a-b/c", "t")
    long = scan_name("r" * 100, "n/" + "x" * 200, "t" * 128)
    assert len(long) <= 253 and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", long)


def test_reconcile_is_idempotent_and_removes_what_is_gone() -> None:
    first = wanted("r", {"team-a/api": ["v1.0.0", "v1.1.0"]}, SEMVER)
    plan = reconcile(first, [])
    assert len(plan.create) == 2 and plan.delete == []
    assert reconcile(first, list(first)).create == []  # a rerun creates nothing
    later = wanted("r", {"team-a/api": ["v1.1.0", "v1.2.0"]}, SEMVER)
    plan = reconcile(later, list(first))
    assert [w.tag for w in plan.create] == ["v1.2.0"]
    assert plan.delete == [scan_name("r", "team-a/api", "v1.0.0")]


def test_a_schedule_runs_once_per_due_time_across_restarts() -> None:
    daily = "0 3 * * *"
    assert schedule_due(daily, None, T0, T0 + timedelta(minutes=59)) is None
    due = schedule_due(daily, None, T0, T0 + timedelta(hours=1, seconds=5))
    assert due == datetime(2026, 11, 29, 3, 0, tzinfo=UTC)
    # The run is recorded as the last run: not due again until tomorrow.
    assert schedule_due(daily, due, T0, due + timedelta(hours=23)) is None
    # Down for three days: one run, for the latest due time.
    assert schedule_due(daily, due, T0, due + timedelta(days=3, hours=1)) == \
        datetime(2026, 12, 2, 3, 0, tzinfo=UTC)


@pytest.mark.parametrize("schedule", ["0 0 30 2 *", "0 0 31 4 *", "not a cron"])
def test_a_schedule_with_no_time_is_a_schedule_error(schedule: str) -> None:
    # Stored behind the webhook's back: croniter's CroniterBadDateError ended the rule
    # controller's task, and main() the process. A ScheduleError is the rule's own.
    with pytest.raises(ScheduleError, match="gives no time"):
        schedule_due(schedule, None, T0, T0 + timedelta(days=1))


def test_manual_runs_and_triggers() -> None:
    assert manual_run_requested("1", None) and manual_run_requested("2", "1")
    assert not manual_run_requested("1", "1") and not manual_run_requested(None, "1")
    assert trigger_of(1, None, False, None, False) == "Create"
    assert trigger_of(2, 1, False, None, False) == "Create"  # the spec changed
    assert trigger_of(2, 2, False, T0, False) == "Schedule"
    assert trigger_of(2, 2, False, None, False) is None
    assert trigger_of(2, 2, True, None, False) == "Manual"
    assert trigger_of(2, 2, True, None, True) is None  # suspend stops every trigger
    assert trigger_of(3, 2, False, T0, True) is None


def test_a_push_reaches_only_the_rules_it_falls_under() -> None:
    rules = [("ns/a", "reg:5000", Scope(("team-a",)), SEMVER, True),
             ("ns/b", "reg:5000", Scope(("team-b",)), SEMVER, True),
             ("ns/c", "other:5000", Scope(("team-a",)), SEMVER, True),
             ("ns/d", "reg:5000", Scope(("team-a",)), SEMVER, False)]
    assert matching_rules(rules, "reg:5000", "team-a/api", "v1.0.0") == ["ns/a"]
    assert matching_rules(rules, "reg:5000", "team-a/api", "latest") == []


# -- the per-rule cap ---------------------------------------------------------------------

def test_a_selection_keeps_the_first_by_repository_and_tag_whatever_the_order() -> None:
    import random

    from scangate.core.rules import Selection

    pairs = [(f"team/r{r}", f"v{t:03d}") for r in range(5) for t in range(40)]
    chosen = []
    for seed in range(3):
        random.Random(seed).shuffle(pairs)
        selection = Selection(50)
        for repository, tag in pairs:
            selection.add(repository, [tag])
            assert len(selection._heap) <= 50  # never holds more than its cap
        chosen.append(selection.by_repository())
        assert selection.offered == 200 and selection.dropped == 150
    assert chosen[0] == chosen[1] == chosen[2]
    assert chosen[0] == {"team/r0": [f"v{t:03d}" for t in range(40)],
                         "team/r1": [f"v{t:03d}" for t in range(10)]}


def test_a_selection_under_its_cap_keeps_everything() -> None:
    from scangate.core.rules import Selection

    selection = Selection(10)
    selection.add("a/b", ["2", "1"])
    selection.add("a/a", ["x"])
    assert selection.by_repository() == {"a/a": ["x"], "a/b": ["1", "2"]}
    assert selection.dropped == 0
