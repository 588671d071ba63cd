"""Checks of user-written patterns that a CRD schema cannot express.

Tag filters are RE2 expressions (the syntax of Go-based registries such as Harbor
and distribution) matched against whole tags. RE2 runs in time linear in the tag,
whatever the expression, so no filter can hang the operator on a crafted tag; an
expression RE2 cannot compile (a back-reference, a lookahead) is refused when it
is written.
"""

from __future__ import annotations

import fnmatch
import re
from datetime import UTC, datetime
from typing import Protocol

import re2  # type: ignore[import-untyped]
from croniter import croniter

MAX_PATTERN_LENGTH = 256


class PatternError(ValueError):
    """A user pattern that cannot be accepted, with the reason."""


class TagFilter(Protocol):
    """A compiled tag filter (an RE2 expression)."""

    pattern: str

    def fullmatch(self, text: str) -> object | None: ...


def check_tag_filter(pattern: str) -> TagFilter:
    """Compile a tag filter as RE2, refusing what RE2 cannot compile."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"longer than {MAX_PATTERN_LENGTH} characters")
    options = re2.Options()
    options.log_errors = False  # the error goes to the user, not to the operator's stderr
    try:
        compiled: TagFilter = re2.compile(pattern, options=options)
    except re2.error as e:
        detail = e.args[0].decode(errors="replace") if e.args and isinstance(
            e.args[0], bytes) else str(e)
        raise PatternError(f"invalid RE2 regular expression: {detail}") from None
    return compiled


def tag_matches(tag_filter: TagFilter, tag: str) -> bool:
    """Whether the filter matches the whole tag."""
    return tag_filter.fullmatch(tag) is not None


def check_cron(expression: str) -> None:
    """Accept standard five-field cron expressions (and @hourly-style macros)."""
    fields = expression.split()
    if not expression.startswith("@") and len(fields) != 5:
        raise PatternError(
            f"cron expression must have 5 fields (minute hour day month weekday), got {len(fields)}"
        )
    if not croniter.is_valid(expression):
        raise PatternError(f"invalid cron expression {expression!r}")
    if any(f.upper().startswith("R") for f in fields if not f.startswith("@")):
        # croniter picks another time each time it reads R: no schedule to keep.
        raise PatternError(f"cron expression {expression!r}: random (R) fields are not "
                           "supported")
    # croniter accepts dates no calendar has (30 February) and raises only when asked for
    # a time: ask now, both ways, as the rule controller will.
    try:
        reference = datetime(2001, 1, 1, tzinfo=UTC)
        croniter(expression, reference).get_next(datetime)
        croniter(expression, reference).get_prev(datetime)
    except Exception:
        raise PatternError(f"cron expression {expression!r} never fires: no date matches "
                           "its day and month") from None


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
