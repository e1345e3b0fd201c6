"""Token buckets: burst, refill, the wait until the next token, and the bound on keys."""

from __future__ import annotations

import pytest
from tally_gateway.ratelimit import TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_granted_then_the_rate_refills_it() -> None:
    clock = Clock()
    buckets = TokenBuckets(2.0, 3, max_keys=10, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token comes back every 0.5 s
    clock.now += 0.25
    assert buckets.take("a") == pytest.approx(0.25)
    clock.now += 0.25
    assert buckets.take("a") == 0.0
    clock.now += 100
    assert [buckets.take("a") for _ in range(4)][-1] > 0  # refilled to the burst, not beyond


def test_each_key_has_its_own_bucket() -> None:
    buckets = TokenBuckets(1.0, 1, max_keys=10, clock=Clock())
    assert buckets.take("a") == 0.0 and buckets.take("a") > 0
    assert buckets.take("b") == 0.0


def test_the_least_recently_used_bucket_is_forgotten_first() -> None:
    clock = Clock()
    buckets = TokenBuckets(1.0, 1, max_keys=2, clock=clock)
    buckets.take("a")
    buckets.take("b")
    buckets.take("a")  # refused, and now the most recently used
    buckets.take("c")  # evicts "b"
    assert len(buckets) == 2
    assert buckets.take("a") > 0  # still remembered, still empty
    assert buckets.take("b") == 0.0  # forgotten: back full


def test_nonsense_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBuckets(0.0, 1, max_keys=1)
    with pytest.raises(ValueError):
        TokenBuckets(1.0, 0, max_keys=1)
