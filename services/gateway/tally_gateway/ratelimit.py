"""Token-bucket rate limits, one bucket per key (a bearer token, a client address).

A bucket holds at most `burst` tokens and refills at `rate_per_second`; a request takes one
token or is refused with the time until one is back (the `Retry-After` of the 429). Buckets
live in this process only, so a gateway with N replicas admits up to N times the rate
behind a load balancer that spreads callers evenly; the limits are set per replica.

At most `max_keys` buckets are kept; the least recently used one is forgotten first. A
forgotten bucket comes back full, so only a caller that stayed idle while `max_keys` others
called gains from it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBuckets:
    """Per-key token buckets with one rate and one burst."""

    def __init__(
        self,
        rate_per_second: float,
        burst: int,
        *,
        max_keys: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_second <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate_per_second must be > 0, burst and max_keys >= 1")
        self._rate = rate_per_second
        self._burst = float(burst)
        self._max_keys = max_keys
        self._clock = clock
        # key → (tokens left, instant they were counted); most recently used last.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Take one token for `key`: 0.0 when granted, else the seconds until one is back."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            tokens = self._burst
            if len(self._buckets) >= self._max_keys:
                self._buckets.popitem(last=False)
        else:
            left, counted_at = bucket
            tokens = min(self._burst, left + (now - counted_at) * self._rate)
            self._buckets.move_to_end(key)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self._rate
