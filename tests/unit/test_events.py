"""Events aggregated as Kubernetes' recorder does: one Event per repeated event."""

from __future__ import annotations

from scangate.core.events import EventCorrelator


def test_a_repeat_goes_to_the_event_it_made_with_its_count() -> None:
    correlator = EventCorrelator()
    key = ("uid-1", "Warning", "RunFailed", "unreachable")
    assert correlator.previous(key) is None
    correlator.record(key, "rule.17f3", 1)
    assert correlator.previous(key) == ("rule.17f3", 1)
    correlator.record(key, "rule.17f3", 2)
    assert correlator.previous(key) == ("rule.17f3", 2)
    # Another message, reason or object is another Event.
    for other in (("uid-1", "Warning", "RunFailed", "refused"),
                  ("uid-2", "Warning", "RunFailed", "unreachable"),
                  ("uid-1", "Normal", "Ran", "unreachable")):
        assert correlator.previous(other) is None


def test_memory_is_bounded_and_the_least_recently_seen_is_forgotten() -> None:
    correlator = EventCorrelator(capacity=3)
    keys = [(f"uid-{i}", "Normal", "Ran", "ok") for i in range(4)]
    for i, key in enumerate(keys[:3]):
        correlator.record(key, f"e{i}", 1)
    assert correlator.previous(keys[0]) == ("e0", 1)  # now the most recently seen
    correlator.record(keys[3], "e3", 1)
    assert correlator.previous(keys[1]) is None
    assert [correlator.previous(k) for k in (keys[0], keys[2], keys[3])] == [
        ("e0", 1), ("e2", 1), ("e3", 1)]


def test_a_forgotten_event_starts_again() -> None:
    correlator = EventCorrelator()
    key = ("uid-1", "Warning", "RunFailed", "unreachable")
    correlator.record(key, "gone", 5)
    correlator.forget(key)
    assert correlator.previous(key) is None
