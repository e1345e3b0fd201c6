"""Request messages -> domain inputs.

Each function reads one request, collects every bad field (paths as in the proto, e.g.
`product.credits`, `price.currency`) and raises one InvalidArgument naming them all, so
that no bad input reaches a database. Rules that need stored state or the clock are the
domain's and the servicer's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import TypeVar
from uuid import UUID

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from tally.catalog.v1 import catalog_service_pb2 as api
from tally.catalog.v1 import resources_pb2
from tally.common.v1 import money_pb2
from tally_kit import amounts, protobuf
from tally_kit.errors import Violations
from tally_kit.idempotency import validate_request_id
from tally_kit.pagination import PageRequest, read_page_request
from tally_kit.text import check_text

from tally_catalog import domain, mapping
from tally_catalog.domain import (
    BillingInterval,
    Distribution,
    DunningPolicy,
    GrantPolicy,
    MerchantConfig,
    Money,
    PlanDraft,
    PostalAddress,
    ProductDraft,
    RuleViolation,
    TaxRegime,
)

T = TypeVar("T")
E = TypeVar("E", bound=Enum)

# ListOperationTypeVersions over every operation code (AIP-159).
EVERY_OPERATION_CODE = "-"


@dataclass(frozen=True)
class CreateMerchant:
    merchant_id: str
    config: MerchantConfig


@dataclass(frozen=True)
class UpdateMerchantConfig:
    merchant_id: str
    # New values by MerchantConfig field name.
    changes: dict[str, object]


@dataclass(frozen=True)
class CreateProduct:
    merchant_id: str
    draft: ProductDraft


@dataclass(frozen=True)
class ProductRef:
    merchant_id: str
    product_id: UUID


@dataclass(frozen=True)
class ListProducts:
    merchant_id: str
    page: PageRequest
    distribution: Distribution | None
    grant_policy: GrantPolicy | None
    show_archived: bool


@dataclass(frozen=True)
class ScheduleProductPrice:
    merchant_id: str
    product_id: UUID
    amount: Money
    # None means now.
    effective_at: datetime | None


@dataclass(frozen=True)
class ListProductPrices:
    merchant_id: str
    product_id: UUID
    currency: str | None
    page: PageRequest


@dataclass(frozen=True)
class GetOffer:
    merchant_id: str
    product_id: UUID
    # None means the merchant's default currency.
    currency: str | None


@dataclass(frozen=True)
class ListOffers:
    merchant_id: str
    currency: str | None
    page: PageRequest


@dataclass(frozen=True)
class ScheduleOperationTypeVersion:
    merchant_id: str
    operation_code: str
    resource_unit: str
    credits_per_unit: Decimal
    effective_at: datetime | None


@dataclass(frozen=True)
class OperationTypeVersionRef:
    merchant_id: str
    operation_code: str
    version: int


@dataclass(frozen=True)
class GetActiveOperationTypeVersion:
    merchant_id: str
    operation_code: str
    # None means now.
    read_at: datetime | None


@dataclass(frozen=True)
class ListOperationTypeVersions:
    merchant_id: str
    # None means every code.
    operation_code: str | None
    page: PageRequest


@dataclass(frozen=True)
class CreateSubscriptionPlan:
    merchant_id: str
    draft: PlanDraft


@dataclass(frozen=True)
class PlanRef:
    merchant_id: str
    plan_id: UUID


@dataclass(frozen=True)
class ListSubscriptionPlans:
    merchant_id: str
    page: PageRequest


# --- field helpers ----------------------------------------------------------------------------
#
# Each helper returns the domain value, or None after recording a violation (optional values
# that are absent are also None where the helper says so).


def _passes(violations: Violations, field: str, check: Callable[[], None]) -> bool:
    """Whether the check passes; records the rule it breaks against `field` when it does not."""
    try:
        check()
    except RuleViolation as error:
        violations.add(field, str(error))
        return False
    return True


def _optional_time(violations: Violations, field: str, present: bool, value: Timestamp) -> datetime | None:
    """None when absent (the caller's default applies) or invalid (recorded)."""
    if not present:
        return None
    converted = protobuf.to_datetime(value)
    if converted is None:
        violations.add(field, "must be a valid timestamp between years 1 and 9999")
    return converted


def _whole_seconds(violations: Violations, field: str, value: Duration) -> timedelta | None:
    if value.nanos:
        violations.add(field, "must be whole seconds")
        return None
    return timedelta(seconds=value.seconds)


def _money(violations: Violations, field: str, present: bool, value: money_pb2.Money) -> Money | None:
    if not present:
        violations.add(field, "is required")
        return None
    amount = violations.rule(
        f"{field}.amount_minor", lambda: domain.check_positive_amount(value.amount_minor)
    )
    currency = violations.rule(f"{field}.currency", lambda: amounts.check_currency(value.currency))
    if amount is None or currency is None:
        return None
    return Money(amount_minor=amount, currency=currency)


def _credits(violations: Violations, field: str, present: bool, value: money_pb2.Credits) -> Decimal | None:
    if not present:
        violations.add(field, "is required")
        return None
    return violations.rule(f"{field}.value", lambda: amounts.parse_credits(value.value))


def _optional_currency(violations: Violations, value: str) -> str | None:
    """None when empty (the caller's default applies) or invalid (recorded)."""
    if not value:
        return None
    return violations.rule("currency", lambda: amounts.check_currency(value))


def _enum(violations: Violations, field: str, number: int, known: Mapping[int, E]) -> E | None:
    value = known.get(number)
    if value is None:
        names = ", ".join(member.name for member in known.values())
        violations.add(field, f"must be one of {names}")
    return value


def _operation_code(violations: Violations, value: str) -> str | None:
    return violations.rule(
        "operation_code",
        lambda: domain.check_pattern(value, domain.OPERATION_CODE_PATTERN, "llm.tokens"),
    )


# --- merchants --------------------------------------------------------------------------------


def _address(
    violations: Violations, field: str, config: resources_pb2.MerchantConfig
) -> PostalAddress | None:
    if not config.HasField("address"):
        violations.add(field, "is required")
        return None
    address = config.address
    lines = list(address.address_lines)
    parts: list[object | None] = []
    if not 1 <= len(lines) <= domain.MAX_ADDRESS_LINES:
        violations.add(f"{field}.address_lines", f"must hold 1 to {domain.MAX_ADDRESS_LINES} lines")
        parts.append(None)
    for index, line in enumerate(lines):
        parts.append(
            violations.rule(
                f"{field}.address_lines[{index}]",
                lambda line=line: check_text(line, domain.MAX_ADDRESS_LINE_LENGTH),
            )
        )
    parts.append(
        violations.rule(
            f"{field}.locality",
            lambda: check_text(address.locality, domain.MAX_LOCALITY_LENGTH),
        )
    )
    parts.append(
        violations.rule(
            f"{field}.administrative_area",
            lambda: domain.check_optional_text(address.administrative_area, domain.MAX_POSTAL_FIELD_LENGTH),
        )
    )
    parts.append(
        violations.rule(
            f"{field}.postal_code",
            lambda: domain.check_optional_text(address.postal_code, domain.MAX_POSTAL_FIELD_LENGTH),
        )
    )
    parts.append(
        violations.rule(
            f"{field}.region_code",
            lambda: domain.check_pattern(address.region_code, domain.REGION_CODE_PATTERN, "FR"),
        )
    )
    if any(part is None for part in parts):
        return None
    return PostalAddress(
        address_lines=tuple(lines),
        locality=address.locality,
        administrative_area=address.administrative_area,
        postal_code=address.postal_code,
        region_code=address.region_code,
    )


def _tax_regime(violations: Violations, field: str, config: resources_pb2.MerchantConfig) -> TaxRegime | None:
    if not config.HasField("tax_regime"):
        violations.add(field, "is required")
        return None
    regime = config.tax_regime
    rate = violations.rule(
        f"{field}.rate_percent", lambda: domain.parse_tax_rate_percent(regime.rate_percent)
    )
    if rate is None:
        return None
    return TaxRegime(rate_percent=rate, prices_include_tax=regime.prices_include_tax)


def _operation_timeout(
    violations: Violations, field: str, config: resources_pb2.MerchantConfig
) -> timedelta | None:
    if not config.HasField("operation_timeout"):
        violations.add(field, "is required")
        return None
    timeout = _whole_seconds(violations, field, config.operation_timeout)
    if timeout is None:
        return None
    return violations.rule(field, lambda: domain.check_operation_timeout(timeout))


# Validator of each MerchantConfig field: (violations, field path, config) -> value or None.
_CONFIG_FIELDS: dict[str, Callable[[Violations, str, resources_pb2.MerchantConfig], object | None]] = {
    "legal_name": lambda v, f, c: v.rule(f, lambda: check_text(c.legal_name, domain.MAX_NAME_LENGTH)),
    "tax_id": lambda v, f, c: v.rule(f, lambda: check_text(c.tax_id, domain.MAX_TAX_ID_LENGTH)),
    "address": _address,
    "receipt_series_prefix": lambda v, f, c: v.rule(
        f,
        lambda: domain.check_pattern(
            c.receipt_series_prefix, domain.RECEIPT_SERIES_PREFIX_PATTERN, "ACME-2025"
        ),
    ),
    "tax_regime": _tax_regime,
    "operation_timeout": _operation_timeout,
    "retention_days": lambda v, f, c: v.rule(
        f, lambda: domain.check_days(c.retention_days, minimum=1, maximum=domain.MAX_DAYS)
    ),
    "default_currency": lambda v, f, c: v.rule(f, lambda: amounts.check_currency(c.default_currency)),
}


def _config_values(
    violations: Violations, prefix: str, config: resources_pb2.MerchantConfig, fields: Sequence[str]
) -> dict[str, object] | None:
    values = {name: _CONFIG_FIELDS[name](violations, f"{prefix}.{name}", config) for name in fields}
    if any(value is None for value in values.values()):
        return None
    return values


def create_merchant(request: api.CreateMerchantRequest) -> CreateMerchant:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    values = None
    if request.HasField("config"):
        values = _config_values(violations, "config", request.config, domain.MERCHANT_CONFIG_FIELDS)
    else:
        violations.add("config", "is required")
    violations.raise_if_any()
    assert values is not None
    return CreateMerchant(merchant_id=request.merchant_id, config=MerchantConfig(**values))  # type: ignore[arg-type]


def get_merchant(request: api.GetMerchantRequest) -> str:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    violations.raise_if_any()
    return request.merchant_id


def update_merchant_config(request: api.UpdateMerchantConfigRequest) -> UpdateMerchantConfig:
    """The fields named by the mask (AIP-134); an empty mask names every field set in `config`."""
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    paths = list(request.update_mask.paths)
    if paths == ["*"]:
        fields: list[str] = list(domain.MERCHANT_CONFIG_FIELDS)
    elif paths:
        fields = []
        for path in paths:
            if path in _CONFIG_FIELDS and path not in fields:
                fields.append(path)
            else:
                violations.add(
                    "update_mask",
                    f"{path!r} is not a MerchantConfig field named once; use one of "
                    f"{', '.join(domain.MERCHANT_CONFIG_FIELDS)}, or '*' alone",
                )
    else:
        fields = [descriptor.name for descriptor, _ in request.config.ListFields()]
        violations.require(bool(fields), "config", "sets no field to change")
    values = _config_values(violations, "config", request.config, fields)
    violations.raise_if_any()
    assert values is not None
    return UpdateMerchantConfig(merchant_id=request.merchant_id, changes=values)


# --- products ---------------------------------------------------------------------------------


def create_product(request: api.CreateProductRequest) -> CreateProduct:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    if not request.HasField("product"):
        violations.add("product", "is required")
        violations.raise_if_any()
    product = request.product
    name = violations.rule("product.name", lambda: check_text(product.name, domain.MAX_NAME_LENGTH))
    credits = _credits(violations, "product.credits", product.HasField("credits"), product.credits)
    access_period_days = None
    if product.HasField("access_period_days"):
        access_period_days = violations.rule(
            "product.access_period_days",
            lambda: domain.check_days(product.access_period_days, minimum=1, maximum=domain.MAX_DAYS),
        )
    distribution = _enum(violations, "product.distribution", product.distribution, mapping.DISTRIBUTIONS)
    grant_policy = None
    grant_policy_known = True
    if product.grant_policy != resources_pb2.GRANT_POLICY_UNSPECIFIED:
        grant_policy = _enum(violations, "product.grant_policy", product.grant_policy, mapping.GRANT_POLICIES)
        grant_policy_known = grant_policy is not None
    if distribution is not None and grant_policy_known:
        _passes(
            violations, "product.grant_policy", lambda: domain.check_grant_policy(distribution, grant_policy)
        )
    violations.raise_if_any()
    assert name is not None and credits is not None and distribution is not None
    return CreateProduct(
        merchant_id=request.merchant_id,
        draft=ProductDraft(
            name=name,
            credits=credits,
            access_period_days=access_period_days,
            distribution=distribution,
            grant_policy=grant_policy,
        ),
    )


def _product_ref(violations: Violations, merchant_id: str, product_id: str) -> ProductRef:
    violations.merchant_id(merchant_id)
    parsed = violations.uuid("product_id", product_id)
    violations.raise_if_any()
    assert parsed is not None
    return ProductRef(merchant_id=merchant_id, product_id=parsed)


def get_product(request: api.GetProductRequest) -> ProductRef:
    return _product_ref(Violations(), request.merchant_id, request.product_id)


def archive_product(request: api.ArchiveProductRequest) -> ProductRef:
    violations = Violations()
    validate_request_id(violations, request.request_id)
    return _product_ref(violations, request.merchant_id, request.product_id)


def list_products(request: api.ListProductsRequest) -> ListProducts:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    distribution = None
    if request.distribution != resources_pb2.PRODUCT_DISTRIBUTION_UNSPECIFIED:
        distribution = _enum(violations, "distribution", request.distribution, mapping.DISTRIBUTIONS)
    grant_policy = None
    if request.grant_policy != resources_pb2.GRANT_POLICY_UNSPECIFIED:
        grant_policy = _enum(violations, "grant_policy", request.grant_policy, mapping.GRANT_POLICIES)
    scope = {
        "list": "products",
        "merchant_id": request.merchant_id,
        "distribution": str(request.distribution),
        "grant_policy": str(request.grant_policy),
        "show_archived": str(request.show_archived),
    }
    page = read_page_request(
        violations,
        page_size=request.page_size,
        page_token=request.page_token,
        scope=scope,
        key=(datetime, UUID),
    )
    violations.raise_if_any()
    return ListProducts(
        merchant_id=request.merchant_id,
        page=page,
        distribution=distribution,
        grant_policy=grant_policy,
        show_archived=request.show_archived,
    )


# --- prices and offers ------------------------------------------------------------------------


def schedule_product_price(request: api.ScheduleProductPriceRequest) -> ScheduleProductPrice:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    product_id = violations.uuid("product_id", request.product_id)
    validate_request_id(violations, request.request_id)
    amount = _money(violations, "price", request.HasField("price"), request.price)
    effective_at = _optional_time(
        violations, "effective_time", request.HasField("effective_time"), request.effective_time
    )
    violations.raise_if_any()
    assert product_id is not None and amount is not None
    return ScheduleProductPrice(
        merchant_id=request.merchant_id, product_id=product_id, amount=amount, effective_at=effective_at
    )


def list_product_prices(request: api.ListProductPricesRequest) -> ListProductPrices:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    product_id = violations.uuid("product_id", request.product_id)
    currency = _optional_currency(violations, request.currency)
    scope = {
        "list": "product_prices",
        "merchant_id": request.merchant_id,
        "product_id": request.product_id,
        "currency": request.currency,
    }
    page = read_page_request(
        violations,
        page_size=request.page_size,
        page_token=request.page_token,
        scope=scope,
        key=(str, datetime, UUID),
    )
    violations.raise_if_any()
    assert product_id is not None
    return ListProductPrices(
        merchant_id=request.merchant_id, product_id=product_id, currency=currency, page=page
    )


def get_offer(request: api.GetOfferRequest) -> GetOffer:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    product_id = violations.uuid("product_id", request.product_id)
    currency = _optional_currency(violations, request.currency)
    violations.raise_if_any()
    assert product_id is not None
    return GetOffer(merchant_id=request.merchant_id, product_id=product_id, currency=currency)


def list_offers(request: api.ListOffersRequest) -> ListOffers:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    currency = _optional_currency(violations, request.currency)
    scope = {"list": "offers", "merchant_id": request.merchant_id, "currency": request.currency}
    page = read_page_request(
        violations,
        page_size=request.page_size,
        page_token=request.page_token,
        scope=scope,
        key=(datetime, UUID),
    )
    violations.raise_if_any()
    return ListOffers(merchant_id=request.merchant_id, currency=currency, page=page)


# --- operation types --------------------------------------------------------------------------


def schedule_operation_type_version(
    request: api.ScheduleOperationTypeVersionRequest,
) -> ScheduleOperationTypeVersion:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    operation_code = _operation_code(violations, request.operation_code)
    validate_request_id(violations, request.request_id)
    resource_unit = violations.rule(
        "resource_unit",
        lambda: domain.check_pattern(request.resource_unit, domain.RESOURCE_UNIT_PATTERN, "token"),
    )
    credits_per_unit = _credits(
        violations, "credits_per_unit", request.HasField("credits_per_unit"), request.credits_per_unit
    )
    effective_at = _optional_time(
        violations, "effective_time", request.HasField("effective_time"), request.effective_time
    )
    violations.raise_if_any()
    assert operation_code is not None and resource_unit is not None and credits_per_unit is not None
    return ScheduleOperationTypeVersion(
        merchant_id=request.merchant_id,
        operation_code=operation_code,
        resource_unit=resource_unit,
        credits_per_unit=credits_per_unit,
        effective_at=effective_at,
    )


def get_operation_type_version(request: api.GetOperationTypeVersionRequest) -> OperationTypeVersionRef:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    operation_code = _operation_code(violations, request.operation_code)
    violations.require(request.version >= 1, "version", "must be 1 or more")
    violations.raise_if_any()
    assert operation_code is not None
    return OperationTypeVersionRef(
        merchant_id=request.merchant_id, operation_code=operation_code, version=request.version
    )


def get_active_operation_type_version(
    request: api.GetActiveOperationTypeVersionRequest,
) -> GetActiveOperationTypeVersion:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    operation_code = _operation_code(violations, request.operation_code)
    read_at = _optional_time(violations, "read_time", request.HasField("read_time"), request.read_time)
    violations.raise_if_any()
    assert operation_code is not None
    return GetActiveOperationTypeVersion(
        merchant_id=request.merchant_id, operation_code=operation_code, read_at=read_at
    )


def list_operation_type_versions(request: api.ListOperationTypeVersionsRequest) -> ListOperationTypeVersions:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    operation_code = None
    if request.operation_code != EVERY_OPERATION_CODE:
        operation_code = _operation_code(violations, request.operation_code)
    scope = {
        "list": "operation_type_versions",
        "merchant_id": request.merchant_id,
        "operation_code": request.operation_code,
    }
    page = read_page_request(
        violations, page_size=request.page_size, page_token=request.page_token, scope=scope, key=(str, int)
    )
    violations.raise_if_any()
    return ListOperationTypeVersions(
        merchant_id=request.merchant_id, operation_code=operation_code, page=page
    )


# --- subscription plans -----------------------------------------------------------------------


def _billing_interval(
    violations: Violations, field: str, plan: resources_pb2.SubscriptionPlan
) -> BillingInterval | None:
    if not plan.HasField("billing_interval"):
        violations.add(field, "is required")
        return None
    unit = _enum(violations, f"{field}.unit", plan.billing_interval.unit, mapping.INTERVAL_UNITS)
    if unit is None:
        return None
    interval = BillingInterval(unit=unit, count=plan.billing_interval.count)
    if not _passes(violations, f"{field}.count", lambda: domain.check_billing_interval(interval)):
        return None
    return interval


def _dunning(
    violations: Violations, field: str, plan: resources_pb2.SubscriptionPlan
) -> DunningPolicy | None:
    if not plan.HasField("dunning"):
        violations.add(f"{field}.final_action", "is required")
        return None
    final_action = _enum(
        violations, f"{field}.final_action", plan.dunning.final_action, mapping.FINAL_ACTIONS
    )
    delays = [
        _whole_seconds(violations, f"{field}.retry_delays[{index}]", delay)
        for index, delay in enumerate(plan.dunning.retry_delays)
    ]
    if any(delay is None for delay in delays):
        return None
    retry_delays = violations.rule(
        f"{field}.retry_delays",
        lambda: domain.dunning_retry_delays([delay for delay in delays if delay is not None]),
    )
    if final_action is None or retry_delays is None:
        return None
    return DunningPolicy(retry_delays=retry_delays, final_action=final_action)


def create_subscription_plan(request: api.CreateSubscriptionPlanRequest) -> CreateSubscriptionPlan:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    if not request.HasField("subscription_plan"):
        violations.add("subscription_plan", "is required")
        violations.raise_if_any()
    plan = request.subscription_plan
    prefix = "subscription_plan"
    name = violations.rule(f"{prefix}.name", lambda: check_text(plan.name, domain.MAX_NAME_LENGTH))
    price = _money(violations, f"{prefix}.price", plan.HasField("price"), plan.price)
    interval = _billing_interval(violations, f"{prefix}.billing_interval", plan)
    trial_days = violations.rule(
        f"{prefix}.trial_days",
        lambda: domain.check_days(plan.trial_days, minimum=0, maximum=domain.MAX_TRIAL_DAYS),
    )
    grant_product_id = violations.uuid(
        f"{prefix}.recurring_grant_product_id", plan.recurring_grant_product_id
    )
    dunning = _dunning(violations, f"{prefix}.dunning", plan)
    violations.raise_if_any()
    assert name is not None and price is not None and interval is not None and trial_days is not None
    assert grant_product_id is not None and dunning is not None
    return CreateSubscriptionPlan(
        merchant_id=request.merchant_id,
        draft=PlanDraft(
            name=name,
            price=price,
            billing_interval=interval,
            trial_days=trial_days,
            recurring_grant_product_id=grant_product_id,
            dunning=dunning,
        ),
    )


def get_subscription_plan(request: api.GetSubscriptionPlanRequest) -> PlanRef:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    plan_id = violations.uuid("plan_id", request.plan_id)
    violations.raise_if_any()
    assert plan_id is not None
    return PlanRef(merchant_id=request.merchant_id, plan_id=plan_id)


def list_subscription_plans(request: api.ListSubscriptionPlansRequest) -> ListSubscriptionPlans:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    scope = {"list": "subscription_plans", "merchant_id": request.merchant_id}
    page = read_page_request(
        violations,
        page_size=request.page_size,
        page_token=request.page_token,
        scope=scope,
        key=(datetime, UUID),
    )
    violations.raise_if_any()
    return ListSubscriptionPlans(merchant_id=request.merchant_id, page=page)
