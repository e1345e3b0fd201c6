"""The bounded cache with per-entry expiry."""

from __future__ import annotations

import pytest
from tally_kit.cache import ExpiringCache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_value_is_returned_until_its_expiry_then_dropped() -> None:
    clock = FakeClock()
    cache: ExpiringCache[str, int] = ExpiringCache(4, clock=clock)
    cache.put("a", 1, expires_at=1010.0)
    clock.now = 1009.999
    assert cache.get("a") == 1
    clock.now = 1010.0
    assert cache.get("a") is None
    assert len(cache) == 0


def test_a_value_already_expired_is_not_stored_and_replaces_nothing() -> None:
    clock = FakeClock()
    cache: ExpiringCache[str, int] = ExpiringCache(4, clock=clock)
    cache.put("a", 1, expires_at=1100.0)
    cache.put("a", 2, expires_at=999.0)
    assert cache.get("a") is None
    assert len(cache) == 0


def test_the_least_recently_used_entry_goes_first_when_full() -> None:
    clock = FakeClock()
    cache: ExpiringCache[str, int] = ExpiringCache(2, clock=clock)
    cache.put("a", 1, expires_at=2000.0)
    cache.put("b", 2, expires_at=2000.0)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3, expires_at=2000.0)
    assert len(cache) == 2
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)


def test_a_cache_holds_at_least_one_entry() -> None:
    with pytest.raises(ValueError):
        ExpiringCache(0)
