"""Short descriptions of pydantic validation errors for status messages and logs."""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation(e: ValidationError, limit: int = 3) -> str:
    """The first `limit` errors as `path: message`, never the offending input itself
    (it may be huge, or a secret)."""
    errors = e.errors(include_url=False, include_context=False, include_input=False)
    parts = [f"{_path(err['loc'])}: {err['msg']}" for err in errors[:limit]]
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)


def _path(loc: tuple[int | str, ...]) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return path or "(top level)"
