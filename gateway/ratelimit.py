"""Token buckets: the per-connection frame and subscribe limits, and the per-process
connect limit. Refill is computed from the clock at each take, so an idle bucket costs
nothing."""

from __future__ import annotations

import time


class TokenBucket:
    """Allows ``rate`` per second on average, bursts up to ``2 * rate`` (at least 1)."""

    __slots__ = ("_cap", "_last", "_rate", "_tokens")

    def __init__(self, rate: float) -> None:
        self._rate = rate
        # At least one whole token: below 0.5/s a cap of 2x would never reach one.
        self._cap = max(2 * rate, 1.0)
        self._tokens = self._cap
        self._last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._cap, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
