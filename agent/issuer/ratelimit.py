"""Per-key token buckets (the issuer limits each node, and token joins per source address). Pure.

``allow(key, cost)`` takes ``cost`` tokens from ``key``'s bucket if it has them; buckets refill at
``rate`` per second up to ``burst``. At most ``max_keys`` buckets are kept: when full, buckets that
refilled completely are forgotten first (they would allow the same as a new one). The clock is injected.
"""

from __future__ import annotations

import time
from typing import Callable


class RateLimiter:
    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self._clock, self._max_keys = rate, burst, clock, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def allow(self, key: str, cost: float = 1.0) -> bool:
        now = self._clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if cost > tokens:
            self._buckets[key] = (tokens, now)
            return False
        if key not in self._buckets and len(self._buckets) >= self._max_keys:
            self._forget_full(now)
        self._buckets[key] = (tokens - cost, now)
        return True

    def _forget_full(self, now: float) -> None:
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for key in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[key]
