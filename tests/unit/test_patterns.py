from __future__ import annotations

import time

import pytest

from scangate.core.patterns import PatternError, check_cron, check_glob, check_tag_filter


@pytest.mark.parametrize("pattern", [
    ".*", r"v[0-9]+\.[0-9]+\.[0-9]+", r"v\d+(\.\d+){0,2}(-rc\d+)?", "^(main|release-.*)$",
    "(a|b)*", "latest|stable",
])
def test_reasonable_tag_filters_are_accepted(pattern: str) -> None:
    assert check_tag_filter(pattern).pattern == pattern


@pytest.mark.parametrize(("pattern", "reason"), [
    ("v(1", "invalid regular expression"),
    ("(a+)+$", "catastrophic backtracking"),
    ("(a*)*b", "catastrophic backtracking"),
    (r"(\w+\s?)*$", "catastrophic backtracking"),
    ("(a|a)*", "overlap"),
    ("(a|ab)+c", "catastrophic backtracking"),
    (r"(a)\1", "back-references"),
    ("x" * 300, "longer than"),
])
def test_dangerous_or_invalid_tag_filters_are_refused(pattern: str, reason: str) -> None:
    with pytest.raises(PatternError, match=reason):
        check_tag_filter(pattern)


def test_refused_pattern_really_backtracks() -> None:
    """The check refuses what would hang: (a+)+$ on 'aaaa...!' is exponential in Python."""
    import re

    pattern = re.compile("(a+)+$")
    started = time.perf_counter()
    pattern.match("a" * 18 + "!")
    slow = time.perf_counter() - started
    started = time.perf_counter()
    re.compile("a+$").match("a" * 18 + "!")
    fast = time.perf_counter() - started
    assert slow > 10 * fast


@pytest.mark.parametrize("expression", ["*/5 * * * *", "0 3 * * 1-5", "@daily", "0 0 1 1 *"])
def test_valid_cron(expression: str) -> None:
    check_cron(expression)


@pytest.mark.parametrize("expression", ["61 * * * *", "* * *", "every day", "0 0 32 * *",
                                        "* * * * * *"])
def test_invalid_cron(expression: str) -> None:
    with pytest.raises(PatternError):
        check_cron(expression)


def test_globs() -> None:
    check_glob("registry.example.com/team-*/api:*")
    check_glob("registry.example.com/[ab]/x")
    for bad in ("", "  ", "registry/[prod"):
        with pytest.raises(PatternError):
            check_glob(bad)
