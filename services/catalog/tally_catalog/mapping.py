"""Protobuf messages <-> domain objects.

Domain to protobuf is total. Protobuf to domain is partial (enums may hold values this
build does not know, timestamps may be out of range): those helpers return None for what
cannot be mapped and leave the wording of the refusal to the validation layer.
"""

from __future__ import annotations

from tally.catalog.v1 import resources_pb2
from tally_kit.amounts import format_decimal
from tally_kit.protobuf import credits, duration, money, timestamp

from tally_catalog.domain import (
    BillingInterval,
    Distribution,
    DunningPolicy,
    FinalAction,
    GrantPolicy,
    IntervalUnit,
    Merchant,
    MerchantConfig,
    Offer,
    OperationTypeVersion,
    PostalAddress,
    Product,
    ProductPrice,
    SubscriptionPlan,
    TaxRegime,
)

DISTRIBUTIONS: dict[int, Distribution] = {
    resources_pb2.PRODUCT_DISTRIBUTION_SELLABLE: Distribution.SELLABLE,
    resources_pb2.PRODUCT_DISTRIBUTION_GRANT: Distribution.GRANT,
}
GRANT_POLICIES: dict[int, GrantPolicy] = {
    resources_pb2.GRANT_POLICY_APPLY_ON_SIGNUP: GrantPolicy.APPLY_ON_SIGNUP,
    resources_pb2.GRANT_POLICY_MANUAL_GRANT: GrantPolicy.MANUAL_GRANT,
}
INTERVAL_UNITS: dict[int, IntervalUnit] = {
    resources_pb2.BILLING_INTERVAL_UNIT_DAY: IntervalUnit.DAY,
    resources_pb2.BILLING_INTERVAL_UNIT_WEEK: IntervalUnit.WEEK,
    resources_pb2.BILLING_INTERVAL_UNIT_MONTH: IntervalUnit.MONTH,
    resources_pb2.BILLING_INTERVAL_UNIT_YEAR: IntervalUnit.YEAR,
}
FINAL_ACTIONS: dict[int, FinalAction] = {
    resources_pb2.DUNNING_FINAL_ACTION_SUSPEND: FinalAction.SUSPEND,
    resources_pb2.DUNNING_FINAL_ACTION_CANCEL: FinalAction.CANCEL,
}

_DISTRIBUTION_NUMBERS = {value: number for number, value in DISTRIBUTIONS.items()}
_GRANT_POLICY_NUMBERS = {value: number for number, value in GRANT_POLICIES.items()}
_INTERVAL_UNIT_NUMBERS = {value: number for number, value in INTERVAL_UNITS.items()}
_FINAL_ACTION_NUMBERS = {value: number for number, value in FINAL_ACTIONS.items()}


def merchant_config(config: MerchantConfig) -> resources_pb2.MerchantConfig:
    return resources_pb2.MerchantConfig(
        legal_name=config.legal_name,
        tax_id=config.tax_id,
        address=postal_address(config.address),
        receipt_series_prefix=config.receipt_series_prefix,
        tax_regime=tax_regime(config.tax_regime),
        operation_timeout=duration(config.operation_timeout),
        retention_days=config.retention_days,
        default_currency=config.default_currency,
    )


def postal_address(address: PostalAddress) -> resources_pb2.PostalAddress:
    return resources_pb2.PostalAddress(
        address_lines=list(address.address_lines),
        locality=address.locality,
        administrative_area=address.administrative_area,
        postal_code=address.postal_code,
        region_code=address.region_code,
    )


def tax_regime(regime: TaxRegime) -> resources_pb2.TaxRegime:
    return resources_pb2.TaxRegime(
        rate_percent=format_decimal(regime.rate_percent), prices_include_tax=regime.prices_include_tax
    )


def merchant(value: Merchant) -> resources_pb2.Merchant:
    return resources_pb2.Merchant(
        merchant_id=value.merchant_id,
        config=merchant_config(value.config),
        config_revision=value.config_revision,
        create_time=timestamp(value.created_at),
        update_time=timestamp(value.updated_at),
    )


def product(value: Product) -> resources_pb2.Product:
    message = resources_pb2.Product(
        product_id=str(value.product_id),
        merchant_id=value.merchant_id,
        name=value.name,
        credits=credits(value.credits),
        distribution=_DISTRIBUTION_NUMBERS[value.distribution],
        grant_policy=(
            _GRANT_POLICY_NUMBERS[value.grant_policy]
            if value.grant_policy is not None
            else resources_pb2.GRANT_POLICY_UNSPECIFIED
        ),
        state=resources_pb2.PRODUCT_STATE_ARCHIVED if value.archived else resources_pb2.PRODUCT_STATE_ACTIVE,
        create_time=timestamp(value.created_at),
    )
    if value.access_period_days is not None:
        message.access_period_days = value.access_period_days
    if value.archived_at is not None:
        message.archive_time.CopyFrom(timestamp(value.archived_at))
    return message


def product_price(value: ProductPrice) -> resources_pb2.ProductPrice:
    message = resources_pb2.ProductPrice(
        price_id=str(value.price_id),
        merchant_id=value.merchant_id,
        product_id=str(value.product_id),
        amount=money(value.amount),
        effective_time=timestamp(value.effective_at),
        create_time=timestamp(value.created_at),
    )
    if value.archived_at is not None:
        message.archive_time.CopyFrom(timestamp(value.archived_at))
    return message


def offer(value: Offer) -> resources_pb2.Offer:
    return resources_pb2.Offer(product=product(value.product), price=product_price(value.price))


def operation_type_version(value: OperationTypeVersion) -> resources_pb2.OperationTypeVersion:
    message = resources_pb2.OperationTypeVersion(
        merchant_id=value.merchant_id,
        operation_code=value.operation_code,
        version=value.version,
        resource_unit=value.resource_unit,
        credits_per_unit=credits(value.credits_per_unit),
        effective_time=timestamp(value.effective_at),
        create_time=timestamp(value.created_at),
    )
    if value.ends_at is not None:
        message.end_time.CopyFrom(timestamp(value.ends_at))
    return message


def billing_interval(value: BillingInterval) -> resources_pb2.BillingInterval:
    return resources_pb2.BillingInterval(unit=_INTERVAL_UNIT_NUMBERS[value.unit], count=value.count)


def dunning_policy(value: DunningPolicy) -> resources_pb2.DunningPolicy:
    return resources_pb2.DunningPolicy(
        retry_delays=[duration(delay) for delay in value.retry_delays],
        final_action=_FINAL_ACTION_NUMBERS[value.final_action],
    )


def subscription_plan(value: SubscriptionPlan) -> resources_pb2.SubscriptionPlan:
    return resources_pb2.SubscriptionPlan(
        plan_id=str(value.plan_id),
        merchant_id=value.merchant_id,
        name=value.name,
        price=money(value.price),
        billing_interval=billing_interval(value.billing_interval),
        trial_days=value.trial_days,
        recurring_grant_product_id=str(value.recurring_grant_product_id),
        dunning=dunning_policy(value.dunning),
        create_time=timestamp(value.created_at),
    )
