"""The token bucket that bounds the scans the admission gate creates."""

from __future__ import annotations

from scangate.core.ratelimit import TokenBucket


def test_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=5)
    assert [bucket.take(100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert bucket.take(100.4) is False  # 0.8 of a token
    assert bucket.take(100.5) is True  # one token after half a second at 2/s
    assert bucket.take(100.5) is False


def test_a_quiet_spell_refills_up_to_the_burst_only() -> None:
    bucket = TokenBucket(rate=10.0, burst=3)
    for _ in range(3):
        assert bucket.take(0.0)
    assert sum(bucket.take(3600.0) for _ in range(10)) == 3


def test_a_clock_going_back_gives_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=1)
    assert bucket.take(50.0) and not bucket.take(10.0) and not bucket.take(50.5)
    assert bucket.take(51.0)
