"""A token bucket: at most `burst` at once, refilled at `rate` a second.

Pure: the caller passes the time (a monotonic clock), so tests pin it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float
    """Tokens added per second."""
    burst: float
    """The most tokens held (and taken at once, after a quiet spell)."""
    tokens: float = field(init=False)
    _stamp: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float) -> bool:
        """Take one token at `now` (seconds, monotonic); False when there is none."""
        if self._stamp is not None and now > self._stamp:
            self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        if self._stamp is None or now > self._stamp:
            self._stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
