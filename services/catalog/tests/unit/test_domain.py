"""The catalog's pure rules: values, products, plans, and versioned timelines (with hypothesis)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tally_catalog import domain
from tally_catalog.domain import (
    BillingInterval,
    Distribution,
    GrantPolicy,
    IntervalUnit,
    Money,
    OperationTypeVersion,
    Product,
    ProductPrice,
    RuleViolation,
)
from tally_kit.errors import FailedPrecondition, InvalidArgument, NotFound

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def _product(**changes: object) -> Product:
    product = Product(
        product_id=uuid4(),
        merchant_id="acme",
        name="Starter pack",
        credits=Decimal("100"),
        access_period_days=30,
        distribution=Distribution.SELLABLE,
        grant_policy=None,
        created_at=T0,
        archived_at=None,
    )
    return dataclasses.replace(product, **changes)


# --- values ---------------------------------------------------------------------------------


def test_tax_rates_are_percentages_with_at_most_four_fractional_digits() -> None:
    assert domain.parse_tax_rate_percent("8.875") == Decimal("8.875")
    assert domain.parse_tax_rate_percent("0") == 0
    assert domain.parse_tax_rate_percent("100") == 100
    for bad in ("100.0001", "-1", "1.00001", "twenty"):
        with pytest.raises(RuleViolation):
            domain.parse_tax_rate_percent(bad)


def test_patterns_match_whole_values_only() -> None:
    assert domain.check_pattern("llm.tokens", domain.OPERATION_CODE_PATTERN, "x") == "llm.tokens"
    for bad in ("LLM", "llm\n", "1llm", "llm tokens", "a" * 64):
        with pytest.raises(RuleViolation):
            domain.check_pattern(bad, domain.OPERATION_CODE_PATTERN, "x")


def test_operation_timeouts_are_whole_seconds_up_to_a_day() -> None:
    assert domain.check_operation_timeout(timedelta(minutes=15)) == timedelta(minutes=15)
    for bad in (timedelta(0), timedelta(hours=24, seconds=1), timedelta(seconds=1.5)):
        with pytest.raises(RuleViolation):
            domain.check_operation_timeout(bad)


# --- products and plans ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("distribution", "policy", "valid"),
    [
        (Distribution.SELLABLE, None, True),
        (Distribution.SELLABLE, GrantPolicy.MANUAL_GRANT, False),
        (Distribution.GRANT, None, False),
        (Distribution.GRANT, GrantPolicy.APPLY_ON_SIGNUP, True),
        (Distribution.GRANT, GrantPolicy.MANUAL_GRANT, True),
    ],
)
def test_grant_policy_is_required_for_grants_and_forbidden_for_sellable_products(
    distribution: Distribution, policy: GrantPolicy | None, valid: bool
) -> None:
    if valid:
        domain.check_grant_policy(distribution, policy)
    else:
        with pytest.raises(RuleViolation):
            domain.check_grant_policy(distribution, policy)


def test_a_product_is_archived_once() -> None:
    archived = domain.archive(_product(), T0 + timedelta(days=1))
    assert archived.archived and archived.archived_at == T0 + timedelta(days=1)
    with pytest.raises(FailedPrecondition) as refused:
        domain.archive(archived, T0 + timedelta(days=2))
    assert refused.value.reason == "PRODUCT_ARCHIVED"


def test_only_active_sellable_products_are_sold() -> None:
    domain.ensure_sellable(_product())
    for product, reason in (
        (_product(archived_at=T0), "PRODUCT_ARCHIVED"),
        (
            _product(distribution=Distribution.GRANT, grant_policy=GrantPolicy.MANUAL_GRANT),
            "PRODUCT_NOT_SELLABLE",
        ),
    ):
        with pytest.raises(FailedPrecondition) as refused:
            domain.ensure_sellable(product)
        assert refused.value.reason == reason


def test_a_recurring_grant_is_an_active_manual_grant_product() -> None:
    grant = _product(distribution=Distribution.GRANT, grant_policy=GrantPolicy.MANUAL_GRANT)
    assert domain.ensure_recurring_grant_product(grant, grant.product_id) is grant
    with pytest.raises(NotFound) as missing:
        domain.ensure_recurring_grant_product(None, uuid4())
    assert missing.value.reason == "PRODUCT_NOT_FOUND"
    for product, reason in (
        (dataclasses.replace(grant, archived_at=T0), "PRODUCT_ARCHIVED"),
        (dataclasses.replace(grant, grant_policy=GrantPolicy.APPLY_ON_SIGNUP), "PRODUCT_NOT_MANUAL_GRANT"),
        (_product(), "PRODUCT_NOT_MANUAL_GRANT"),
    ):
        with pytest.raises(FailedPrecondition) as refused:
            domain.ensure_recurring_grant_product(product, product.product_id)
        assert refused.value.reason == reason


def test_dunning_defaults_to_one_day_and_three_days_after_an_hour() -> None:
    assert domain.dunning_retry_delays([]) == (timedelta(hours=1), timedelta(hours=24), timedelta(hours=72))


@pytest.mark.parametrize(
    ("hours", "complaint"),
    [
        ([1, 1], "longer than delay 0"),
        ([2, 1], "longer than delay 0"),
        ([0], "positive"),
        ([-1], "positive"),
        ([0.5, 1.0001], "whole seconds"),
        ([24 * 91], "at most 90 days"),
        (list(range(1, 12)), "at most 10"),
    ],
)
def test_dunning_delays_are_positive_whole_seconds_strictly_increasing(
    hours: list[float], complaint: str
) -> None:
    with pytest.raises(RuleViolation, match=complaint):
        domain.dunning_retry_delays([timedelta(hours=h) for h in hours])


@given(st.lists(st.integers(min_value=1, max_value=90 * 86400), min_size=1, max_size=10, unique=True))
def test_any_increasing_schedule_of_whole_seconds_is_kept_as_given(seconds: list[int]) -> None:
    delays = [timedelta(seconds=s) for s in sorted(seconds)]
    assert domain.dunning_retry_delays(delays) == tuple(delays)


def test_billing_intervals_are_at_most_five_years() -> None:
    for unit, maximum in domain.MAX_INTERVAL_COUNT.items():
        domain.check_billing_interval(BillingInterval(unit, 1))
        domain.check_billing_interval(BillingInterval(unit, maximum))
        for bad in (0, maximum + 1):
            with pytest.raises(RuleViolation):
                domain.check_billing_interval(BillingInterval(unit, bad))
    assert domain.MAX_INTERVAL_COUNT.keys() == set(IntervalUnit)


def test_reconfiguring_to_the_same_values_changes_nothing() -> None:
    config = domain.MerchantConfig(
        legal_name="Acme SAS",
        tax_id="FR123",
        address=domain.PostalAddress(("1 rue de la Paix",), "Paris", "", "75002", "FR"),
        receipt_series_prefix="ACME",
        tax_regime=domain.TaxRegime(Decimal(20), True),
        operation_timeout=timedelta(minutes=15),
        retention_days=3650,
        default_currency="EUR",
    )
    merchant = domain.Merchant("acme", config, 1, T0, T0)
    assert domain.reconfigure(merchant, {"legal_name": "Acme SAS"}, T0 + timedelta(hours=1)) is merchant
    changed = domain.reconfigure(merchant, {"default_currency": "USD"}, T0 + timedelta(hours=1))
    assert changed.config.default_currency == "USD"
    assert changed.config.legal_name == "Acme SAS"
    assert changed.config_revision == 2
    assert changed.updated_at == T0 + timedelta(hours=1)


# --- versioned timelines ---------------------------------------------------------------------


def _schedule_version(
    existing: Sequence[OperationTypeVersion], start: datetime, now: datetime
) -> domain.OperationTypeChange:
    return domain.schedule_operation_type_version(
        existing,
        merchant_id="acme",
        operation_code="llm.tokens",
        resource_unit="token",
        credits_per_unit=Decimal("0.001"),
        effective_at=start,
        now=now,
    )


def _apply_version(
    versions: list[OperationTypeVersion], change: domain.OperationTypeChange
) -> list[OperationTypeVersion]:
    kept = [v for v in versions if change.previous is None or v.version != change.previous.version]
    return sorted(
        [*kept, *([change.previous] if change.previous else []), change.version], key=lambda v: v.version
    )


def test_the_first_version_starts_the_chain() -> None:
    change = _schedule_version([], T0, T0)
    assert change.previous is None
    assert change.version.version == 1 and change.version.ends_at is None


def test_a_new_version_ends_the_open_one_where_it_starts() -> None:
    first = _schedule_version([], T0, T0).version
    change = _schedule_version([first], T0 + timedelta(days=3), T0 + timedelta(days=1))
    assert change.previous == dataclasses.replace(first, ends_at=T0 + timedelta(days=3))
    assert change.version.version == 2
    assert change.version.effective_at == T0 + timedelta(days=3)


def test_a_version_in_the_past_is_refused() -> None:
    with pytest.raises(InvalidArgument) as refused:
        _schedule_version([], T0 - timedelta(microseconds=1), T0)
    assert [v.field for v in refused.value.violations] == ["effective_time"]


@pytest.mark.parametrize("offset", [timedelta(0), -timedelta(hours=1)])
def test_a_version_at_or_before_a_scheduled_one_is_refused(offset: timedelta) -> None:
    scheduled = _schedule_version([], T0 + timedelta(days=10), T0).version
    with pytest.raises(FailedPrecondition) as refused:
        _schedule_version([scheduled], T0 + timedelta(days=10) + offset, T0)
    assert refused.value.reason == "OPERATION_TYPE_VERSION_OVERLAP"


def test_the_active_version_is_the_one_covering_the_instant() -> None:
    versions: list[OperationTypeVersion] = []
    for day in (0, 5, 9):
        versions = _apply_version(versions, _schedule_version(versions, T0 + timedelta(days=day), T0))

    def active_number(instant: datetime) -> int | None:
        active = domain.active_version(versions, instant)
        return active.version if active is not None else None

    assert active_number(T0 - timedelta(microseconds=1)) is None
    assert active_number(T0) == 1
    assert active_number(T0 + timedelta(days=5) - timedelta(microseconds=1)) == 1
    assert active_number(T0 + timedelta(days=5)) == 2
    assert active_number(T0 + timedelta(days=5000)) == 3


# A step of a random history: the clock moves forward, then someone schedules a version
# starting `offset` seconds from the new now (negative offsets are in the past).
_steps = st.lists(
    st.tuples(st.integers(min_value=0, max_value=5_000), st.integers(min_value=-200, max_value=20_000)),
    min_size=1,
    max_size=25,
)


def _probe_instants(starts: Sequence[datetime]) -> set[datetime]:
    instants = {T0 - timedelta(seconds=1)}
    for start in starts:
        instants |= {start - timedelta(microseconds=1), start, start + timedelta(microseconds=1)}
    return instants


@settings(max_examples=200, deadline=None)
@given(_steps)
def test_operation_type_versions_never_overlap_and_leave_no_gap(steps: list[tuple[int, int]]) -> None:
    now = T0
    versions: list[OperationTypeVersion] = []
    for advance, offset in steps:
        now += timedelta(seconds=advance)
        start = now + timedelta(seconds=offset)
        latest_start = max((v.effective_at for v in versions), default=None)
        try:
            change = _schedule_version(versions, start, now)
        except InvalidArgument:
            assert start < now
            continue
        except FailedPrecondition as refused:
            assert refused.reason == "OPERATION_TYPE_VERSION_OVERLAP"
            assert latest_start is not None and start <= latest_start
            continue
        assert start >= now and (latest_start is None or start > latest_start)
        versions = _apply_version(versions, change)

    # A chain: numbered 1..n, each version ending exactly where the next starts, the last open.
    assert [v.version for v in versions] == list(range(1, len(versions) + 1))
    for earlier, later in itertools.pairwise(versions):
        assert earlier.ends_at == later.effective_at
        assert earlier.effective_at < later.effective_at
    if versions:
        assert versions[-1].ends_at is None
    # At every instant at most one version is active, and exactly one after the first start.
    for instant in _probe_instants([v.effective_at for v in versions]):
        covering = [
            v for v in versions if v.effective_at <= instant and (v.ends_at is None or instant < v.ends_at)
        ]
        assert len(covering) <= 1
        if versions and instant >= versions[0].effective_at:
            assert len(covering) == 1
        assert domain.active_version(versions, instant) == (covering[0] if covering else None)


def _price(
    product: Product, amount: Money, start: datetime, now: datetime, existing: list[ProductPrice]
) -> domain.PriceChange:
    return domain.schedule_price(
        existing, price_id=uuid4(), product=product, amount=amount, effective_at=start, now=now
    )


@settings(max_examples=200, deadline=None)
@given(_steps, st.lists(st.sampled_from(["EUR", "USD"]), min_size=25, max_size=25))
def test_price_versions_never_overlap_per_product_and_currency(
    steps: list[tuple[int, int]], currencies: list[str]
) -> None:
    product = _product()
    now = T0
    prices: dict[UUID, ProductPrice] = {}
    for (advance, offset), currency in zip(steps, currencies, strict=False):
        now += timedelta(seconds=advance)
        start = now + timedelta(seconds=offset)
        try:
            change = _price(product, Money(1000, currency), start, now, list(prices.values()))
        except (InvalidArgument, FailedPrecondition):
            continue
        if change.superseded is not None:
            assert change.superseded.amount.currency == currency
            assert change.superseded.archived_at == start
            prices[change.superseded.price_id] = change.superseded
        prices[change.price.price_id] = change.price

    for currency in ("EUR", "USD"):
        timeline = sorted(
            (p for p in prices.values() if p.amount.currency == currency), key=lambda p: p.effective_at
        )
        for earlier, later in itertools.pairwise(timeline):
            assert earlier.archived_at == later.effective_at
        assert all(p.archived_at is None for p in timeline[-1:])
        for instant in _probe_instants([p.effective_at for p in timeline]):
            in_effect = [
                p
                for p in timeline
                if p.effective_at <= instant and (p.archived_at is None or instant < p.archived_at)
            ]
            assert len(in_effect) <= 1
            assert domain.price_in_effect(list(prices.values()), currency, instant) == (
                in_effect[0] if in_effect else None
            )


def test_a_price_is_only_scheduled_for_an_active_sellable_product() -> None:
    for product, reason in (
        (_product(archived_at=T0), "PRODUCT_ARCHIVED"),
        (
            _product(distribution=Distribution.GRANT, grant_policy=GrantPolicy.MANUAL_GRANT),
            "PRODUCT_NOT_SELLABLE",
        ),
    ):
        with pytest.raises(FailedPrecondition) as refused:
            _price(product, Money(1000, "EUR"), T0, T0, [])
        assert refused.value.reason == reason


def test_a_price_overlapping_a_scheduled_one_is_refused_but_other_currencies_are_independent() -> None:
    product = _product()
    scheduled = _price(product, Money(1000, "EUR"), T0 + timedelta(days=2), T0, []).price
    with pytest.raises(FailedPrecondition) as refused:
        _price(product, Money(900, "EUR"), T0 + timedelta(days=1), T0, [scheduled])
    assert refused.value.reason == "PRICE_VERSION_OVERLAP"
    other = _price(product, Money(1100, "USD"), T0 + timedelta(days=1), T0, [scheduled])
    assert other.superseded is None


def test_optional_text_may_be_empty_but_otherwise_follows_the_text_rule() -> None:
    assert domain.check_optional_text("", 10) == ""
    assert domain.check_optional_text("Suite 5", 10) == "Suite 5"
    with pytest.raises(RuleViolation, match="at most 10"):
        domain.check_optional_text("x" * 11, 10)
