"""Checks of user-written patterns that a CRD schema cannot express.

Tag filters are Python regular expressions matched against whole tags. Python's
engine backtracks, so a filter whose repetitions nest or overlap (`(a+)+$`,
`(a|a)*`) can take exponential time on a crafted tag; such filters are refused
when they are written, not discovered while a registry is being listed. The
check is deliberately conservative: any unbounded repetition inside another is
refused (`([a-z]+-)*` can be written `[a-z-]*`).
"""

from __future__ import annotations

import fnmatch
import re

# The stdlib's own regex parser (public as sre_parse before 3.11, deprecated there since).
from re import _constants as sre_constants  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

from croniter import croniter

MAX_PATTERN_LENGTH = 256
_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT}
_UNBOUNDED = sre_constants.MAXREPEAT


class PatternError(ValueError):
    """A user pattern that cannot be accepted, with the reason."""


def check_tag_filter(pattern: str) -> re.Pattern[str]:
    """Compile a tag filter, refusing invalid and catastrophic-backtracking patterns."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"longer than {MAX_PATTERN_LENGTH} characters")
    try:
        compiled = re.compile(pattern)
        tree = sre_parse.parse(pattern)
    except re.error as e:
        raise PatternError(f"invalid regular expression: {e}") from None
    if _has_backreference(tree):
        raise PatternError("back-references are not allowed in tag filters")
    problem = _nested_repeat(tree, inside_unbounded=False)
    if problem:
        raise PatternError(
            f"catastrophic backtracking risk: {problem}; rewrite without nested or "
            "overlapping unbounded repetition (e.g. `(a+)+` -> `a+`)"
        )
    return compiled


def _items(tree: Any) -> list[tuple[Any, Any]]:
    return list(tree.data if hasattr(tree, "data") else tree)


def _children(op: Any, av: Any) -> list[Any]:
    """The sub-patterns of one parsed node."""
    if op in _REPEATS:
        return [av[2]]
    if op == sre_constants.SUBPATTERN:
        return [av[3]]
    if op == sre_constants.BRANCH:
        return list(av[1])
    if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
        return [av[1]]
    if op == sre_constants.ATOMIC_GROUP:
        return [av]
    if op == sre_constants.GROUPREF_EXISTS:
        return [x for x in av[1:] if x is not None]
    return []


def _has_backreference(tree: Any) -> bool:
    for op, av in _items(tree):
        if op in (sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS):
            return True
        if any(_has_backreference(child) for child in _children(op, av)):
            return True
    return False


def _overlapping_branches(av: Any) -> bool:
    """A crude test for alternatives that can match the same text, e.g. `(a|a)` or `(a|ab)`."""
    firsts = []
    for branch in av[1]:
        items = _items(branch)
        if not items:
            return True
        firsts.append(repr(items[0]))
    return len(set(firsts)) != len(firsts)


def _nested_repeat(tree: Any, inside_unbounded: bool) -> str | None:
    for op, av in _items(tree):
        if op in _REPEATS:
            unbounded = av[1] == _UNBOUNDED or av[1] > 100
            body = av[2]
            if unbounded and inside_unbounded:
                return "an unbounded repetition inside another"
            if unbounded and any(
                o == sre_constants.BRANCH and _overlapping_branches(a)
                for o, a in _flatten(body)
            ):
                return "a repeated alternation whose branches overlap"
            found = _nested_repeat(body, inside_unbounded or unbounded)
            if found:
                return found
            continue
        for child in _children(op, av):
            found = _nested_repeat(child, inside_unbounded)
            if found:
                return found
    return None


def _flatten(tree: Any) -> list[tuple[Any, Any]]:
    """The nodes of a sub-pattern, descending through groups but not repetitions."""
    out = []
    for op, av in _items(tree):
        out.append((op, av))
        if op == sre_constants.SUBPATTERN:
            out.extend(_flatten(av[3]))
    return out


def check_cron(expression: str) -> None:
    """Accept standard five-field cron expressions (and @hourly-style macros)."""
    fields = expression.split()
    if not expression.startswith("@") and len(fields) != 5:
        raise PatternError(
            f"cron expression must have 5 fields (minute hour day month weekday), got {len(fields)}"
        )
    if not croniter.is_valid(expression):
        raise PatternError(f"invalid cron expression {expression!r}")


def check_glob(pattern: str) -> None:
    """Globs match normalised image references; a bracket must be closed."""
    if not pattern.strip():
        raise PatternError("empty pattern")
    depth = 0
    for ch in pattern:
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
    if depth:
        raise PatternError(f"unclosed '[' in glob {pattern!r}")
    try:
        re.compile(fnmatch.translate(pattern))
    except re.error as e:  # pragma: no cover - translate escapes almost everything
        raise PatternError(f"invalid glob {pattern!r}: {e}") from None
