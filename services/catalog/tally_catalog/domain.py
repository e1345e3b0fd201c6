"""The catalog's resources and the rules they obey.

Pure: no I/O, no clock (callers pass `now`), no protobuf. Credits, decimals and
currencies follow the kit's `tally_kit.amounts`. Value checks raise `RuleViolation` with
a description the validation layer attaches to the offending field; rules that depend
on stored state raise the kit's errors with a reason.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TypeVar
from uuid import UUID

from tally_kit.amounts import (
    Money,
    parse_decimal,
)
from tally_kit.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound, RuleViolation
from tally_kit.text import check_text

TAX_RATE_FRACTION_DIGITS = 4
MAX_TAX_RATE_PERCENT = Decimal(100)

MAX_NAME_LENGTH = 200
MAX_TAX_ID_LENGTH = 64
MAX_ADDRESS_LINES = 4
MAX_ADDRESS_LINE_LENGTH = 200
MAX_LOCALITY_LENGTH = 100
MAX_POSTAL_FIELD_LENGTH = 100
MAX_DAYS = 36500
MIN_OPERATION_TIMEOUT = timedelta(seconds=1)
MAX_OPERATION_TIMEOUT = timedelta(hours=24)
MAX_TRIAL_DAYS = 365
DEFAULT_DUNNING_RETRY_DELAYS = (timedelta(hours=1), timedelta(hours=24), timedelta(hours=72))
MAX_DUNNING_RETRIES = 10
MAX_DUNNING_DELAY = timedelta(days=90)

OPERATION_CODE_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
RESOURCE_UNIT_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")
RECEIPT_SERIES_PREFIX_PATTERN = re.compile(r"[A-Z0-9][A-Z0-9-]{0,15}")
REGION_CODE_PATTERN = re.compile(r"[A-Z]{2}")


class Distribution(enum.Enum):
    SELLABLE = "sellable"
    GRANT = "grant"


class GrantPolicy(enum.Enum):
    APPLY_ON_SIGNUP = "apply_on_signup"
    MANUAL_GRANT = "manual_grant"


class IntervalUnit(enum.Enum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


class FinalAction(enum.Enum):
    SUSPEND = "suspend"
    CANCEL = "cancel"


# A billing interval is at most five years long, whatever its unit.
MAX_INTERVAL_COUNT: Mapping[IntervalUnit, int] = {
    IntervalUnit.DAY: 1826,
    IntervalUnit.WEEK: 260,
    IntervalUnit.MONTH: 60,
    IntervalUnit.YEAR: 5,
}


@dataclass(frozen=True)
class PostalAddress:
    address_lines: tuple[str, ...]
    locality: str
    administrative_area: str
    postal_code: str
    region_code: str


@dataclass(frozen=True)
class TaxRegime:
    rate_percent: Decimal
    prices_include_tax: bool


@dataclass(frozen=True)
class MerchantConfig:
    legal_name: str
    tax_id: str
    address: PostalAddress
    receipt_series_prefix: str
    tax_regime: TaxRegime
    operation_timeout: timedelta
    retention_days: int
    default_currency: str


MERCHANT_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(MerchantConfig))


@dataclass(frozen=True)
class Merchant:
    merchant_id: str
    config: MerchantConfig
    config_revision: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ProductDraft:
    """A product as a client describes it, before it gets an id."""

    name: str
    credits: Decimal
    access_period_days: int | None
    distribution: Distribution
    grant_policy: GrantPolicy | None


@dataclass(frozen=True)
class Product:
    product_id: UUID
    merchant_id: str
    name: str
    credits: Decimal
    access_period_days: int | None
    distribution: Distribution
    grant_policy: GrantPolicy | None
    created_at: datetime
    archived_at: datetime | None

    @property
    def archived(self) -> bool:
        return self.archived_at is not None


@dataclass(frozen=True)
class ProductPrice:
    price_id: UUID
    merchant_id: str
    product_id: UUID
    amount: Money
    effective_at: datetime
    # Exclusive end: when the next version took over; None while this is the latest version.
    archived_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class Offer:
    product: Product
    price: ProductPrice


@dataclass(frozen=True)
class OperationTypeVersion:
    merchant_id: str
    operation_code: str
    version: int
    resource_unit: str
    credits_per_unit: Decimal
    effective_at: datetime
    # Exclusive end: when the next version takes over; None while this is the latest version.
    ends_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class BillingInterval:
    unit: IntervalUnit
    count: int


@dataclass(frozen=True)
class DunningPolicy:
    # Measured from the first failed charge of a period.
    retry_delays: tuple[timedelta, ...]
    final_action: FinalAction


@dataclass(frozen=True)
class PlanDraft:
    """A subscription plan as a client describes it, before it gets an id."""

    name: str
    price: Money
    billing_interval: BillingInterval
    trial_days: int
    recurring_grant_product_id: UUID
    dunning: DunningPolicy


@dataclass(frozen=True)
class SubscriptionPlan:
    plan_id: UUID
    merchant_id: str
    name: str
    price: Money
    billing_interval: BillingInterval
    trial_days: int
    recurring_grant_product_id: UUID
    dunning: DunningPolicy
    created_at: datetime


# --- values -------------------------------------------------------------------------------


def parse_tax_rate_percent(text: str) -> Decimal:
    value = parse_decimal(text, TAX_RATE_FRACTION_DIGITS)
    if not 0 <= value <= MAX_TAX_RATE_PERCENT:
        raise RuleViolation("must be between 0 and 100")
    return value


def check_positive_amount(amount_minor: int) -> int:
    if amount_minor <= 0:
        raise RuleViolation("must be greater than 0")
    return amount_minor


def check_optional_text(value: str, max_length: int) -> str:
    return check_text(value, max_length) if value else value


def check_pattern(value: str, pattern: re.Pattern[str], example: str) -> str:
    if not pattern.fullmatch(value):
        raise RuleViolation(f"must match {pattern.pattern}, such as {example}")
    return value


def check_days(days: int, *, minimum: int, maximum: int) -> int:
    if not minimum <= days <= maximum:
        raise RuleViolation(f"must be between {minimum} and {maximum}")
    return days


def check_operation_timeout(timeout: timedelta) -> timedelta:
    if timeout.microseconds:
        raise RuleViolation("must be whole seconds")
    if not MIN_OPERATION_TIMEOUT <= timeout <= MAX_OPERATION_TIMEOUT:
        raise RuleViolation("must be between 1 second and 24 hours")
    return timeout


def check_grant_policy(distribution: Distribution, grant_policy: GrantPolicy | None) -> None:
    """Grants say when they are issued; sellable products are issued by purchase only."""
    if distribution is Distribution.GRANT and grant_policy is None:
        raise RuleViolation("is required for a GRANT product")
    if distribution is Distribution.SELLABLE and grant_policy is not None:
        raise RuleViolation("must be unset for a SELLABLE product")


def check_billing_interval(interval: BillingInterval) -> None:
    maximum = MAX_INTERVAL_COUNT[interval.unit]
    if not 1 <= interval.count <= maximum:
        raise RuleViolation(f"must be between 1 and {maximum} for {interval.unit.name}")


def dunning_retry_delays(delays: Sequence[timedelta]) -> tuple[timedelta, ...]:
    """The retry schedule to store: the default when none is given, else a checked copy."""
    if not delays:
        return DEFAULT_DUNNING_RETRY_DELAYS
    if len(delays) > MAX_DUNNING_RETRIES:
        raise RuleViolation(f"must hold at most {MAX_DUNNING_RETRIES} delays")
    for index, delay in enumerate(delays):
        if delay.microseconds:
            raise RuleViolation(f"delay {index} must be whole seconds")
        if delay <= timedelta(0):
            raise RuleViolation(f"delay {index} must be positive")
        if delay > MAX_DUNNING_DELAY:
            raise RuleViolation(f"delay {index} must be at most {MAX_DUNNING_DELAY.days} days")
        if index and delay <= delays[index - 1]:
            raise RuleViolation(f"delay {index} must be longer than delay {index - 1}")
    return tuple(delays)


# --- merchants ----------------------------------------------------------------------------


def reconfigure(merchant: Merchant, changes: Mapping[str, object], now: datetime) -> Merchant:
    """The merchant with `changes` applied; unchanged (same revision) when nothing differs."""
    config = dataclasses.replace(merchant.config, **changes)
    if config == merchant.config:
        return merchant
    return dataclasses.replace(
        merchant, config=config, config_revision=merchant.config_revision + 1, updated_at=now
    )


# --- products -----------------------------------------------------------------------------


def new_product(draft: ProductDraft, *, product_id: UUID, merchant_id: str, now: datetime) -> Product:
    return Product(
        product_id=product_id,
        merchant_id=merchant_id,
        name=draft.name,
        credits=draft.credits,
        access_period_days=draft.access_period_days,
        distribution=draft.distribution,
        grant_policy=draft.grant_policy,
        created_at=now,
        archived_at=None,
    )


def archive(product: Product, now: datetime) -> Product:
    if product.archived:
        raise FailedPrecondition(
            f"product {product.product_id} is already archived", reason="PRODUCT_ARCHIVED"
        )
    return dataclasses.replace(product, archived_at=now)


def ensure_sellable(product: Product) -> None:
    """Only active sellable products are priced and offered."""
    if product.archived:
        raise FailedPrecondition(f"product {product.product_id} is archived", reason="PRODUCT_ARCHIVED")
    if product.distribution is not Distribution.SELLABLE:
        raise FailedPrecondition(
            f"product {product.product_id} is a grant, which is never sold", reason="PRODUCT_NOT_SELLABLE"
        )


def ensure_recurring_grant_product(product: Product | None, product_id: UUID) -> Product:
    """A plan's recurring grant must be an active grant issued on demand, never on signup."""
    if product is None:
        raise NotFound(f"product {product_id} does not exist", reason="PRODUCT_NOT_FOUND")
    if product.archived:
        raise FailedPrecondition(f"product {product_id} is archived", reason="PRODUCT_ARCHIVED")
    if product.distribution is not Distribution.GRANT or product.grant_policy is not GrantPolicy.MANUAL_GRANT:
        raise FailedPrecondition(
            f"product {product_id} is not a GRANT product with the MANUAL_GRANT policy",
            reason="PRODUCT_NOT_MANUAL_GRANT",
        )
    return product


def new_plan(draft: PlanDraft, *, plan_id: UUID, merchant_id: str, now: datetime) -> SubscriptionPlan:
    return SubscriptionPlan(
        plan_id=plan_id,
        merchant_id=merchant_id,
        name=draft.name,
        price=draft.price,
        billing_interval=draft.billing_interval,
        trial_days=draft.trial_days,
        recurring_grant_product_id=draft.recurring_grant_product_id,
        dunning=draft.dunning,
        created_at=now,
    )


# --- versioned timelines (prices, operation types) -----------------------------------------
#
# A timeline is a chain of half-open periods [start, end). A new version may only start now
# or later and strictly after every existing version's start; the latest (open-ended)
# version then ends where the new one starts. Hence periods never overlap, leave no gap, and
# from the first start on exactly one version covers any instant.

_Version = TypeVar("_Version", ProductPrice, OperationTypeVersion)


def _start(version: ProductPrice | OperationTypeVersion) -> datetime:
    return version.effective_at


def _end(version: ProductPrice | OperationTypeVersion) -> datetime | None:
    return version.archived_at if isinstance(version, ProductPrice) else version.ends_at


def _covers(version: ProductPrice | OperationTypeVersion, instant: datetime) -> bool:
    end = _end(version)
    return _start(version) <= instant and (end is None or instant < end)


def _predecessor(
    timeline: Sequence[_Version], start: datetime, now: datetime, *, overlap_reason: str
) -> _Version | None:
    """The version a new one starting at `start` succeeds, or a refusal."""
    if start < now:
        raise InvalidArgument([FieldViolation("effective_time", "must be now or later, never in the past")])
    latest: _Version | None = None
    for version in timeline:
        if _start(version) >= start:
            raise FailedPrecondition(
                f"a version already starts at {_start(version).isoformat()}, not before {start.isoformat()}",
                reason=overlap_reason,
            )
        if latest is None or _start(version) > _start(latest):
            latest = version
    if latest is not None:
        end = _end(latest)
        if end is not None and end > start:
            raise FailedPrecondition(
                f"the latest version already ends at {end.isoformat()}, after {start.isoformat()}",
                reason=overlap_reason,
            )
    return latest


def _active(timeline: Sequence[_Version], instant: datetime) -> _Version | None:
    return next((version for version in timeline if _covers(version, instant)), None)


@dataclass(frozen=True)
class PriceChange:
    price: ProductPrice
    # The previous version, archived at the new one's start; None for a currency's first price.
    superseded: ProductPrice | None


def schedule_price(
    existing: Sequence[ProductPrice],
    *,
    price_id: UUID,
    product: Product,
    amount: Money,
    effective_at: datetime,
    now: datetime,
) -> PriceChange:
    """A new price version for the product in `amount.currency`; `existing` may hold any currency."""
    ensure_sellable(product)
    timeline = [p for p in existing if p.amount.currency == amount.currency]
    previous = _predecessor(timeline, effective_at, now, overlap_reason="PRICE_VERSION_OVERLAP")
    superseded = None
    if previous is not None and previous.archived_at is None:
        superseded = dataclasses.replace(previous, archived_at=effective_at)
    price = ProductPrice(
        price_id=price_id,
        merchant_id=product.merchant_id,
        product_id=product.product_id,
        amount=amount,
        effective_at=effective_at,
        archived_at=None,
        created_at=now,
    )
    return PriceChange(price=price, superseded=superseded)


def price_in_effect(prices: Sequence[ProductPrice], currency: str, instant: datetime) -> ProductPrice | None:
    return _active([p for p in prices if p.amount.currency == currency], instant)


@dataclass(frozen=True)
class OperationTypeChange:
    version: OperationTypeVersion
    # The version it follows, now ending at the new one's start; None for a code's first version.
    previous: OperationTypeVersion | None


def schedule_operation_type_version(
    existing: Sequence[OperationTypeVersion],
    *,
    merchant_id: str,
    operation_code: str,
    resource_unit: str,
    credits_per_unit: Decimal,
    effective_at: datetime,
    now: datetime,
) -> OperationTypeChange:
    """The next version of `operation_code`; `existing` holds every version of that code."""
    previous = _predecessor(existing, effective_at, now, overlap_reason="OPERATION_TYPE_VERSION_OVERLAP")
    ended = None
    if previous is not None and previous.ends_at is None:
        ended = dataclasses.replace(previous, ends_at=effective_at)
    version = OperationTypeVersion(
        merchant_id=merchant_id,
        operation_code=operation_code,
        version=max((v.version for v in existing), default=0) + 1,
        resource_unit=resource_unit,
        credits_per_unit=credits_per_unit,
        effective_at=effective_at,
        ends_at=None,
        created_at=now,
    )
    return OperationTypeChange(version=version, previous=ended)


def active_version(
    versions: Sequence[OperationTypeVersion], instant: datetime
) -> OperationTypeVersion | None:
    return _active(versions, instant)
