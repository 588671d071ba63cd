from __future__ import annotations

import time

import pytest

from scangate.core.patterns import (
    PatternError,
    check_cron,
    check_glob,
    check_tag_filter,
    tag_matches,
)


@pytest.mark.parametrize("pattern", [
    ".*", r"v[0-9]+\.[0-9]+\.[0-9]+", r"v\d+(\.\d+){0,2}(-rc\d+)?", "^(main|release-.*)$",
    "(a|b)*", "latest|stable", r"(?P<major>\d+)\.\d+",
])
def test_reasonable_tag_filters_are_accepted(pattern: str) -> None:
    assert check_tag_filter(pattern).pattern == pattern


@pytest.mark.parametrize(("pattern", "reason"), [
    ("v(1", "missing \\)"),
    (r"(a)\1", "invalid escape sequence"),
    ("(?=v)v1", "invalid perl operator"),
    ("x" * 300, "longer than"),
])
def test_what_re2_cannot_compile_is_refused(pattern: str, reason: str) -> None:
    with pytest.raises(PatternError, match=reason):
        check_tag_filter(pattern)


@pytest.mark.parametrize("pattern", [
    "((a|b)|a)*c", "(a?){50}a{50}", ".*.*.*.*.*x", "(a+)+$", r"(\w+\s?)*$",
])
def test_backtracking_bombs_match_in_linear_time(pattern: str) -> None:
    """Each of these takes exponential (or high-polynomial) time in a backtracking engine;
    RE2 answers at once on a tag of the longest kind a registry allows (a backtracking
    engine would not finish on 128 characters)."""
    compiled = check_tag_filter(pattern)
    tag = "a" * 128
    started = time.perf_counter()
    for _ in range(100):
        assert not tag_matches(compiled, tag + "!")
    assert (time.perf_counter() - started) / 100 < 0.05


def test_whole_tag_must_match() -> None:
    compiled = check_tag_filter(r"v\d+\.\d+\.\d+")
    assert tag_matches(compiled, "v1.2.3")
    assert not tag_matches(compiled, "v1.2.3-rc1")
    assert not tag_matches(compiled, "xv1.2.3")


@pytest.mark.parametrize("expression", ["*/5 * * * *", "0 3 * * 1-5", "@daily", "0 0 1 1 *"])
def test_valid_cron(expression: str) -> None:
    check_cron(expression)


@pytest.mark.parametrize("expression", ["61 * * * *", "* * *", "every day", "0 0 32 * *",
                                        "* * * * * *"])
def test_invalid_cron(expression: str) -> None:
    with pytest.raises(PatternError):
        check_cron(expression)


@pytest.mark.parametrize("expression", ["0 0 30 2 *", "0 0 31 4 *", "0 0 31 2,4,6,9,11 *",
                                        "15 3 30-31 2 *"])
def test_a_cron_that_never_fires_is_refused(expression: str) -> None:
    # croniter calls these valid, then raises CroniterBadDateError when asked for a time:
    # a ScanRule holding one stopped the rule controller, and with it the operator.
    with pytest.raises(PatternError, match="never"):
        check_cron(expression)


def test_a_random_cron_is_refused() -> None:
    # croniter's R picks another time each time it is read: no stable schedule.
    with pytest.raises(PatternError, match="R"):
        check_cron("R 3 * * *")


@pytest.mark.parametrize("expression", ["0 0 29 2 *", "0 0 30 2 1", "0 0 31 * *"])
def test_a_rare_but_real_cron_is_accepted(expression: str) -> None:
    check_cron(expression)  # every fourth year; Mondays (day-of-month OR weekday); 7 a year


def test_globs() -> None:
    check_glob("registry.example.com/team-*/api:*")
    check_glob("registry.example.com/[ab]/x")
    for bad in ("", "  ", "registry/[prod"):
        with pytest.raises(PatternError):
            check_glob(bad)
