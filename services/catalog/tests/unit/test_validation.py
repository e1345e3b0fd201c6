"""Requests become domain inputs, or one INVALID_ARGUMENT naming every bad field by its proto path."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from tally.catalog.v1 import catalog_service_pb2 as api
from tally.catalog.v1 import resources_pb2 as res
from tally.common.v1.money_pb2 import Credits, Money
from tally_catalog import domain, validation
from tally_catalog.domain import Distribution, FinalAction, GrantPolicy, IntervalUnit
from tally_kit.errors import InvalidArgument

PRODUCT_ID = "0b6f3c1e-8f0a-4c5e-9a51-2f4f1c9e7d10"


def _config() -> res.MerchantConfig:
    return res.MerchantConfig(
        legal_name="Acme SAS",
        tax_id="FR40303265045",
        address=res.PostalAddress(
            address_lines=["1 rue de la Paix"], locality="Paris", postal_code="75002", region_code="FR"
        ),
        receipt_series_prefix="ACME-2030",
        tax_regime=res.TaxRegime(rate_percent="20", prices_include_tax=True),
        operation_timeout=Duration(seconds=900),
        retention_days=3650,
        default_currency="EUR",
    )


def _fields(call: Callable[[Message], object], request: Message) -> list[str]:
    with pytest.raises(InvalidArgument) as refused:
        call(request)
    return [violation.field for violation in refused.value.violations]


def test_a_valid_merchant_becomes_its_config() -> None:
    command = validation.create_merchant(
        api.CreateMerchantRequest(merchant_id="acme", request_id="r1", config=_config())
    )
    assert command.merchant_id == "acme"
    assert command.config.tax_regime == domain.TaxRegime(Decimal(20), True)
    assert command.config.operation_timeout == timedelta(minutes=15)
    assert command.config.address.address_lines == ("1 rue de la Paix",)


def test_every_config_field_has_a_validator() -> None:
    assert tuple(validation._CONFIG_FIELDS) == domain.MERCHANT_CONFIG_FIELDS
    assert tuple(res.MerchantConfig.DESCRIPTOR.fields_by_name) == domain.MERCHANT_CONFIG_FIELDS


def test_every_bad_merchant_field_is_named() -> None:
    config = _config()
    config.legal_name = " "
    config.address.address_lines.append("x" * 201)
    config.address.region_code = "France"
    config.receipt_series_prefix = "acme"
    config.tax_regime.rate_percent = "20.00001"
    config.operation_timeout.nanos = 5
    config.retention_days = 0
    config.default_currency = "EURO"
    request = api.CreateMerchantRequest(merchant_id="A", request_id="", config=config)
    assert _fields(validation.create_merchant, request) == [
        "merchant_id",
        "request_id",
        "config.legal_name",
        "config.address.address_lines[1]",
        "config.address.region_code",
        "config.receipt_series_prefix",
        "config.tax_regime.rate_percent",
        "config.operation_timeout",
        "config.retention_days",
        "config.default_currency",
    ]


def test_missing_config_parts_are_required() -> None:
    assert _fields(
        validation.create_merchant, api.CreateMerchantRequest(merchant_id="acme", request_id="r")
    ) == ["config"]
    config = _config()
    for name in ("address", "tax_regime", "operation_timeout"):
        config.ClearField(name)
    request = api.CreateMerchantRequest(merchant_id="acme", request_id="r", config=config)
    assert _fields(validation.create_merchant, request) == [
        "config.address",
        "config.tax_regime",
        "config.operation_timeout",
    ]


def test_a_config_update_changes_the_masked_fields_only() -> None:
    request = api.UpdateMerchantConfigRequest(
        merchant_id="acme",
        request_id="r",
        config=res.MerchantConfig(default_currency="USD", legal_name=""),
        update_mask=FieldMask(paths=["default_currency"]),
    )
    assert validation.update_merchant_config(request).changes == {"default_currency": "USD"}


def test_without_a_mask_the_fields_set_are_changed() -> None:
    request = api.UpdateMerchantConfigRequest(
        merchant_id="acme",
        request_id="r",
        config=res.MerchantConfig(retention_days=30, tax_regime=res.TaxRegime(rate_percent="0")),
    )
    assert validation.update_merchant_config(request).changes == {
        "tax_regime": domain.TaxRegime(Decimal(0), False),
        "retention_days": 30,
    }


def test_a_star_mask_replaces_the_whole_config() -> None:
    request = api.UpdateMerchantConfigRequest(
        merchant_id="acme",
        request_id="r",
        config=res.MerchantConfig(legal_name="x"),
        update_mask=FieldMask(paths=["*"]),
    )
    assert "config.tax_id" in _fields(validation.update_merchant_config, request)
    request.config.CopyFrom(_config())
    assert set(validation.update_merchant_config(request).changes) == set(domain.MERCHANT_CONFIG_FIELDS)


@pytest.mark.parametrize(
    "paths", [["nope"], ["tax_regime.rate_percent"], ["legal_name", "legal_name"], ["*", "tax_id"]]
)
def test_unknown_or_repeated_mask_paths_are_refused(paths: list[str]) -> None:
    request = api.UpdateMerchantConfigRequest(
        merchant_id="acme", request_id="r", config=_config(), update_mask=FieldMask(paths=paths)
    )
    assert "update_mask" in _fields(validation.update_merchant_config, request)


def test_an_empty_update_is_refused() -> None:
    request = api.UpdateMerchantConfigRequest(merchant_id="acme", request_id="r")
    assert _fields(validation.update_merchant_config, request) == ["config"]


def _product_request(**fields: object) -> api.CreateProductRequest:
    product = res.Product(
        name="Starter pack",
        credits=Credits(value="100.5"),
        distribution=res.PRODUCT_DISTRIBUTION_SELLABLE,
        # Output-only fields are ignored.
        product_id="ignored",
        state=res.PRODUCT_STATE_ARCHIVED,
    )
    for name, value in fields.items():
        if isinstance(value, Message):
            getattr(product, name).CopyFrom(value)
        else:
            setattr(product, name, value)
    return api.CreateProductRequest(merchant_id="acme", request_id="r", product=product)


def test_a_valid_product_becomes_a_draft() -> None:
    draft = validation.create_product(_product_request(access_period_days=30)).draft
    assert draft == domain.ProductDraft("Starter pack", Decimal("100.5"), 30, Distribution.SELLABLE, None)
    grant = validation.create_product(
        _product_request(
            distribution=res.PRODUCT_DISTRIBUTION_GRANT, grant_policy=res.GRANT_POLICY_APPLY_ON_SIGNUP
        )
    ).draft
    assert grant.grant_policy is GrantPolicy.APPLY_ON_SIGNUP and grant.access_period_days is None


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"credits": Credits(value="0")}, ["product.credits.value"]),
        ({"credits": Credits(value="1.1234567")}, ["product.credits.value"]),
        ({"credits": Credits(value="1e2")}, ["product.credits.value"]),
        ({"name": ""}, ["product.name"]),
        ({"access_period_days": 0}, ["product.access_period_days"]),
        ({"distribution": res.PRODUCT_DISTRIBUTION_UNSPECIFIED}, ["product.distribution"]),
        ({"distribution": 42}, ["product.distribution"]),
        ({"grant_policy": res.GRANT_POLICY_MANUAL_GRANT}, ["product.grant_policy"]),
        ({"distribution": res.PRODUCT_DISTRIBUTION_GRANT}, ["product.grant_policy"]),
        ({"distribution": res.PRODUCT_DISTRIBUTION_GRANT, "grant_policy": 9}, ["product.grant_policy"]),
    ],
)
def test_bad_products_are_refused_by_field(fields: dict[str, object], expected: list[str]) -> None:
    assert _fields(validation.create_product, _product_request(**fields)) == expected


def test_a_product_without_credits_is_refused() -> None:
    request = _product_request()
    request.product.ClearField("credits")
    assert _fields(validation.create_product, request) == ["product.credits"]


def test_prices_need_a_positive_amount_in_a_known_currency() -> None:
    request = api.ScheduleProductPriceRequest(
        merchant_id="acme", product_id=PRODUCT_ID, request_id="r", price=Money(amount_minor=0, currency="eur")
    )
    assert _fields(validation.schedule_product_price, request) == ["price.amount_minor", "price.currency"]
    request.ClearField("price")
    assert _fields(validation.schedule_product_price, request) == ["price"]


def test_a_price_without_a_time_takes_effect_at_the_servers_now() -> None:
    request = api.ScheduleProductPriceRequest(
        merchant_id="acme",
        product_id=PRODUCT_ID,
        request_id="r",
        price=Money(amount_minor=990, currency="EUR"),
    )
    command = validation.schedule_product_price(request)
    assert command.effective_at is None and command.amount == domain.Money(990, "EUR")
    request.effective_time.FromDatetime(datetime(2030, 1, 1, tzinfo=UTC))
    assert validation.schedule_product_price(request).effective_at == datetime(2030, 1, 1, tzinfo=UTC)
    request.effective_time.CopyFrom(Timestamp(seconds=-(10**13)))
    assert _fields(validation.schedule_product_price, request) == ["effective_time"]


@pytest.mark.parametrize(
    "product_id", ["", "42", "0B6F3C1E8F0A4C5E9A512F4F1C9E7D10", "{0b6f3c1e-8f0a-4c5e-9a51-2f4f1c9e7d10}"]
)
def test_ids_are_canonical_uuids(product_id: str) -> None:
    assert _fields(
        validation.get_product, api.GetProductRequest(merchant_id="acme", product_id=product_id)
    ) == ["product_id"]


def test_ids_are_case_insensitive() -> None:
    ref = validation.get_product(api.GetProductRequest(merchant_id="acme", product_id=PRODUCT_ID.upper()))
    assert ref.product_id == UUID(PRODUCT_ID)


def test_operation_type_versions_are_checked_field_by_field() -> None:
    request = api.ScheduleOperationTypeVersionRequest(
        merchant_id="acme",
        operation_code="LLM tokens",
        request_id="r",
        resource_unit="Token",
        credits_per_unit=Credits(value="-0.5"),
    )
    assert _fields(validation.schedule_operation_type_version, request) == [
        "operation_code",
        "resource_unit",
        "credits_per_unit.value",
    ]
    request.operation_code, request.resource_unit, request.credits_per_unit.value = (
        "llm.tokens",
        "token",
        "0.002",
    )
    command = validation.schedule_operation_type_version(request)
    assert command.credits_per_unit == Decimal("0.002") and command.effective_at is None


def test_listing_every_operation_code_uses_the_wildcard() -> None:
    query = validation.list_operation_type_versions(
        api.ListOperationTypeVersionsRequest(merchant_id="acme", operation_code="-")
    )
    assert query.operation_code is None
    assert _fields(
        validation.list_operation_type_versions,
        api.ListOperationTypeVersionsRequest(merchant_id="acme", operation_code="", page_size=-1),
    ) == ["operation_code", "page_size"]


def test_a_version_number_starts_at_one() -> None:
    request = api.GetOperationTypeVersionRequest(merchant_id="acme", operation_code="llm.tokens", version=0)
    assert _fields(validation.get_operation_type_version, request) == ["version"]


def _plan_request() -> api.CreateSubscriptionPlanRequest:
    return api.CreateSubscriptionPlanRequest(
        merchant_id="acme",
        request_id="r",
        subscription_plan=res.SubscriptionPlan(
            name="Pro monthly",
            price=Money(amount_minor=1999, currency="EUR"),
            billing_interval=res.BillingInterval(unit=res.BILLING_INTERVAL_UNIT_MONTH, count=1),
            trial_days=14,
            recurring_grant_product_id=PRODUCT_ID,
            dunning=res.DunningPolicy(final_action=res.DUNNING_FINAL_ACTION_SUSPEND),
        ),
    )


def test_a_valid_plan_gets_the_default_dunning_schedule() -> None:
    draft = validation.create_subscription_plan(_plan_request()).draft
    assert draft.billing_interval == domain.BillingInterval(IntervalUnit.MONTH, 1)
    assert draft.dunning == domain.DunningPolicy(domain.DEFAULT_DUNNING_RETRY_DELAYS, FinalAction.SUSPEND)
    assert draft.recurring_grant_product_id == UUID(PRODUCT_ID)


def test_every_bad_plan_field_is_named() -> None:
    request = _plan_request()
    plan = request.subscription_plan
    plan.name = ""
    plan.price.currency = "XXX"
    plan.billing_interval.count = 61
    plan.trial_days = -1
    plan.recurring_grant_product_id = ""
    plan.dunning.final_action = res.DUNNING_FINAL_ACTION_UNSPECIFIED
    plan.dunning.retry_delays.extend([Duration(seconds=7200), Duration(seconds=3600)])
    assert _fields(validation.create_subscription_plan, request) == [
        "subscription_plan.name",
        "subscription_plan.price.currency",
        "subscription_plan.billing_interval.count",
        "subscription_plan.trial_days",
        "subscription_plan.recurring_grant_product_id",
        "subscription_plan.dunning.final_action",
        "subscription_plan.dunning.retry_delays",
    ]


def test_dunning_delays_must_be_whole_seconds() -> None:
    request = _plan_request()
    request.subscription_plan.dunning.retry_delays.extend(
        [Duration(seconds=60), Duration(seconds=120, nanos=1)]
    )
    assert _fields(validation.create_subscription_plan, request) == [
        "subscription_plan.dunning.retry_delays[1]"
    ]


def test_a_plan_without_interval_or_dunning_is_refused() -> None:
    request = _plan_request()
    request.subscription_plan.ClearField("billing_interval")
    request.subscription_plan.ClearField("dunning")
    assert _fields(validation.create_subscription_plan, request) == [
        "subscription_plan.billing_interval",
        "subscription_plan.dunning.final_action",
    ]


def test_offers_default_to_the_merchant_currency() -> None:
    assert (
        validation.get_offer(api.GetOfferRequest(merchant_id="acme", product_id=PRODUCT_ID)).currency is None
    )
    assert _fields(
        validation.list_offers, api.ListOffersRequest(merchant_id="acme", currency="euro", page_token="zz")
    ) == ["currency", "page_token"]


def test_reads_check_the_merchant_id() -> None:
    assert _fields(validation.get_merchant, api.GetMerchantRequest(merchant_id="Acme Corp")) == [
        "merchant_id"
    ]
    assert _fields(validation.list_subscription_plans, api.ListSubscriptionPlansRequest(merchant_id="")) == [
        "merchant_id"
    ]


def test_archiving_names_every_bad_field() -> None:
    request = api.ArchiveProductRequest(merchant_id="acme", product_id=PRODUCT_ID)
    assert _fields(validation.archive_product, request) == ["request_id"]
    request.product_id = "42"
    assert _fields(validation.archive_product, request) == ["request_id", "product_id"]
