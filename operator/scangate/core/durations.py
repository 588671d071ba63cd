"""Durations as users write them in specs: `90s`, `10m`, `1h30m`, `7d`."""

from __future__ import annotations

import re
from datetime import timedelta

from scangate.api.common import DURATION_PATTERN

_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_DAYS = 3650
MAX_DURATION = timedelta(days=MAX_DAYS)
"""Ten years: longer than any timeout, age or interval means anything, and far from
timedelta's limit, so that arithmetic on a parsed duration (now + it, it * 2**16) cannot
overflow. `1000000000d` matches the CRDs' pattern; without the bound it raised
OverflowError wherever it was parsed."""


def parse_duration(text: str) -> timedelta:
    """Parse a Go-style duration with an added `d` (days) unit.

    >>> parse_duration("1h30m")
    datetime.timedelta(seconds=5400)
    """
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit, e.g. 90s, 10m, 1h30m, 7d")
    seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _PART.findall(text))
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"invalid duration {text!r}: longer than {MAX_DAYS}d")
    return timedelta(seconds=seconds)
