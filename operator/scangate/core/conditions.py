"""Status conditions as apimachinery's `meta.SetStatusCondition` writes them: a
condition's `lastTransitionTime` moves only when its status does, so `kubectl describe`
says since when something has been true, not when it was last checked."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def condition(type_: str, status: str, reason: str, message: str, generation: int,
              held: Iterable[Mapping[str, Any]], now: str) -> dict[str, Any]:
    """The condition `type_` as it should be written, given the conditions `held` now."""
    before = next((c for c in held if c.get("type") == type_), {})
    since = before.get("lastTransitionTime") if before.get("status") == status else None
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since or now, "observedGeneration": generation}
