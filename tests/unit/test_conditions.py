"""A condition's lastTransitionTime moves only when its status does."""

from __future__ import annotations

from scangate.core.conditions import condition

HELD = [{"type": "Ready", "status": "False", "reason": "RegistryUnavailable",
         "message": "down", "lastTransitionTime": "2026-12-01T10:00:00Z",
         "observedGeneration": 1}]


def test_the_time_stays_while_the_status_does_whatever_else_changes() -> None:
    again = condition("Ready", "False", "RegistryAuthFailed", "refused", 2, HELD,
                      "2026-12-01T11:00:00Z")
    assert again == {"type": "Ready", "status": "False", "reason": "RegistryAuthFailed",
                     "message": "refused", "lastTransitionTime": "2026-12-01T10:00:00Z",
                     "observedGeneration": 2}


def test_the_time_moves_when_the_status_does_or_the_condition_is_new() -> None:
    now = "2026-12-01T11:00:00Z"
    assert condition("Ready", "True", "Ran", "ok", 1, HELD, now)["lastTransitionTime"] == now
    assert condition("TooLarge", "False", "WithinLimits", "ok", 1, HELD,
                     now)["lastTransitionTime"] == now
