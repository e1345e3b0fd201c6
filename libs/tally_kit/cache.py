"""A bounded in-memory cache whose entries each carry their own expiry.

For values that are costly to compute and stay valid until a known instant, e.g. a
verified bearer token until its `exp`. Least recently used entries go first when the
cache is full; an entry past its expiry is never returned. Safe to share between the
event loop and worker threads.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    """At most `max_entries` values, each until its `expires_at` on `clock` (seconds)."""

    def __init__(self, max_entries: int, *, clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        """The value stored under `key`, None when absent or expired (an expired one is dropped)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            value, expires_at = entry
            if self._clock() >= expires_at:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V, expires_at: float) -> None:
        """Stores `value` until `expires_at`; one already expired is not stored."""
        with self._lock:
            if self._clock() >= expires_at:
                self._entries.pop(key, None)
                return
            self._entries[key] = (value, expires_at)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
