"""Domain objects -> protobuf messages, and what the provider says -> domain events.

The second half is what the servicer, the webhook consumer and the reconciliation job share:
an answer to a call (`answer_event`), and a transaction as the provider shows it now
(`charge_events`), become the events `domain.transition` applies. Text the provider supplies
is cut to what the schema keeps, and anything in it that looks like more than the last four
digits of a card is masked before it is kept.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from decimal import Decimal

from tally.common.v1 import money_pb2
from tally.payment_gateway.v1 import resources_pb2
from tally_kit.protobuf import timestamp

from tally_payment_gateway import domain
from tally_payment_gateway.domain import (
    DECLINED,
    PROVIDER_ERROR,
    Approved,
    Event,
    Held,
    Intent,
    Operation,
    Origin,
    OutcomeUnknown,
    Payment,
    PaymentState,
    ProviderCaptured,
    ProviderVoided,
    RefundRecord,
    Refused,
)
from tally_payment_gateway.provider import (
    Outcome,
    ProviderResult,
    TransactionDetails,
    TransactionStatus,
)
from tally_payment_gateway.store import StoredPaymentMethod

PAYMENT_STATES: Mapping[int, PaymentState] = {
    resources_pb2.PAYMENT_STATE_PENDING: PaymentState.PENDING,
    resources_pb2.PAYMENT_STATE_AUTHORIZED: PaymentState.AUTHORIZED,
    resources_pb2.PAYMENT_STATE_CAPTURED: PaymentState.CAPTURED,
    resources_pb2.PAYMENT_STATE_PARTIALLY_REFUNDED: PaymentState.PARTIALLY_REFUNDED,
    resources_pb2.PAYMENT_STATE_REFUNDED: PaymentState.REFUNDED,
    resources_pb2.PAYMENT_STATE_VOIDED: PaymentState.VOIDED,
    resources_pb2.PAYMENT_STATE_FAILED: PaymentState.FAILED,
    resources_pb2.PAYMENT_STATE_UNKNOWN: PaymentState.UNKNOWN,
    resources_pb2.PAYMENT_STATE_CHARGED_BACK: PaymentState.CHARGED_BACK,
}
_STATE_NUMBERS = {state: number for number, state in PAYMENT_STATES.items()}
_INTENT_NUMBERS = {
    Intent.PURCHASE: resources_pb2.PAYMENT_INTENT_PURCHASE,
    Intent.AUTHORIZE: resources_pb2.PAYMENT_INTENT_AUTHORIZE,
}
_OPERATION_NUMBERS = {
    Operation.PURCHASE: resources_pb2.PAYMENT_OPERATION_PURCHASE,
    Operation.AUTHORIZE: resources_pb2.PAYMENT_OPERATION_AUTHORIZE,
    Operation.CAPTURE: resources_pb2.PAYMENT_OPERATION_CAPTURE,
    Operation.VOID: resources_pb2.PAYMENT_OPERATION_VOID,
    Operation.REFUND: resources_pb2.PAYMENT_OPERATION_REFUND,
}
_ORIGIN_NUMBERS = {
    Origin.TALLY: resources_pb2.CHANGE_ORIGIN_TALLY,
    Origin.PROVIDER: resources_pb2.CHANGE_ORIGIN_PROVIDER,
}

# The schema's lengths for text the provider supplies.
MAX_FAILURE_MESSAGE_LENGTH = 1000
MAX_ACCOUNT_TYPE_LENGTH = 32
# Ids of refunds made at the provider, derived from the provider's transaction id so that every
# report of one refund (a redelivered notification, the reconciliation job) names it alike.
_PROVIDER_REFUND_NAMESPACE = uuid.UUID("5c0f7a9e-2d43-4b8e-9a61-7e0b3f2c8d15")
# More than four digits in a row: never kept from a provider's masked card number.
_LONG_DIGIT_RUN = re.compile(r"[0-9]{5,}")


# --- protobuf -----------------------------------------------------------------------------


def money(amount_minor: int, currency: str) -> money_pb2.Money:
    return money_pb2.Money(amount_minor=amount_minor, currency=currency)


def refund(value: RefundRecord, currency: str) -> resources_pb2.Refund:
    return resources_pb2.Refund(
        refund_id=str(value.refund_id),
        amount=money(value.amount_minor, currency),
        provider_reference=value.provider_reference,
        origin=_ORIGIN_NUMBERS[value.origin],
        reason=value.reason,
        create_time=timestamp(value.created_at),
    )


def payment(value: Payment) -> resources_pb2.Payment:
    message = resources_pb2.Payment(
        payment_id=str(value.payment_id),
        merchant_id=value.merchant_id,
        user_id=value.user_id,
        order_id=value.order_id,
        product_id=value.product_id,
        intent=_INTENT_NUMBERS[value.intent],
        state=_STATE_NUMBERS[value.state],
        amount=money(value.amount_minor, value.currency),
        captured_amount=money(value.captured_minor, value.currency),
        refunded_amount=money(value.refunded_minor, value.currency),
        payment_method_id="" if value.payment_method_id is None else str(value.payment_method_id),
        provider=value.provider,
        provider_reference=value.provider_reference,
        provider_order_reference=value.provider_order_reference,
        held_for_review=value.held_for_review,
        pending_operation=(
            resources_pb2.PAYMENT_OPERATION_UNSPECIFIED
            if value.pending is None
            else _OPERATION_NUMBERS[value.pending.operation]
        ),
        failure_code=value.failure_code,
        failure_message=value.failure_message,
        refunds=[refund(record, value.currency) for record in value.refunds],
        account_suffix=value.account_suffix,
        account_type=value.account_type,
        create_time=timestamp(value.created_at),
        update_time=timestamp(value.updated_at),
    )
    if value.chargeback is not None:
        message.chargeback.CopyFrom(
            resources_pb2.Chargeback(
                chargeback_id=value.chargeback.chargeback_id,
                amount=money(value.chargeback.amount_minor, value.currency),
                create_time=timestamp(value.chargeback.created_at),
            )
        )
    return message


def payment_method(value: StoredPaymentMethod) -> resources_pb2.PaymentMethod:
    return resources_pb2.PaymentMethod(
        payment_method_id=str(value.payment_method_id),
        merchant_id=value.merchant_id,
        user_id=value.user_id,
        provider=value.provider,
        label=value.label,
        create_time=timestamp(value.created_at),
    )


# --- what the provider says ---------------------------------------------------------------


def answer_event(result: ProviderResult) -> Event:
    """The event settling a call with the provider's answer to it."""
    match result.outcome:
        case Outcome.APPROVED:
            return Approved(
                result.transaction_id,
                _account_suffix(result.account_suffix),
                _account_type(result.account_type),
            )
        case Outcome.HELD:
            return Held(
                result.transaction_id,
                _account_suffix(result.account_suffix),
                _account_type(result.account_type),
            )
        case Outcome.DECLINED:
            return Refused(DECLINED, _failure_message(result.code, result.message))
        case Outcome.ERROR:
            return Refused(PROVIDER_ERROR, _failure_message(result.code, result.message))
        case Outcome.UNKNOWN:
            return OutcomeUnknown()
    raise ValueError(f"unknown provider outcome {result.outcome!r}")


def charge_events(
    payment: Payment, charge: TransactionDetails, *, declined_code: str = DECLINED
) -> list[Event]:
    """The events settling the payment's pending PURCHASE or AUTHORIZE with the charge as the
    provider shows it now, and catching up with what happened to it since; none when the
    provider's status says nothing certain yet."""
    approved = Approved(
        charge.transaction_id, _account_suffix(charge.account_suffix), _account_type(charge.account_type)
    )
    match charge.status:
        case TransactionStatus.HELD:
            return [Held(approved.provider_reference, approved.account_suffix, approved.account_type)]
        case TransactionStatus.DECLINED:
            return [Refused(declined_code, _failure_message("", charge.provider_status))]
        case TransactionStatus.ERROR | TransactionStatus.EXPIRED:
            return [Refused(PROVIDER_ERROR, _failure_message("", charge.provider_status))]
        case TransactionStatus.AUTHORIZED | TransactionStatus.CHARGED_BACK:
            # A chargeback arrives with its own notification, which names the dispute.
            return [approved]
        case TransactionStatus.COMPLETED:
            if payment.intent is Intent.AUTHORIZE:
                # Captured at the provider since it was authorized.
                return [approved, ProviderCaptured(amount_minor(charge.settled_amount, payment.currency))]
            return [approved]
        case TransactionStatus.VOIDED:
            return [approved, ProviderVoided(provider_refund_id(payment.merchant_id, charge.transaction_id))]
    return []


def amount_minor(value: Decimal, currency: str) -> int:
    """A provider's amount in the currency's major unit as minor units; RuleViolation when the
    amount is finer than the currency allows."""
    return domain.parse_amount(value, currency)


def provider_refund_id(merchant_id: str, provider_transaction_id: str) -> uuid.UUID:
    """The id of a refund made at the provider (or a capture voided there), the same each time
    it is reported."""
    return uuid.uuid5(_PROVIDER_REFUND_NAMESPACE, f"{merchant_id}/{provider_transaction_id}")


def _failure_message(code: str, message: str) -> str:
    text = f"{code}: {message}" if code and message else code or message
    return text[:MAX_FAILURE_MESSAGE_LENGTH]


def _account_suffix(text: str) -> str:
    """The provider's masked card number as kept: at most its last four digits, `X` before them."""
    if not _LONG_DIGIT_RUN.search(text) and len(text) <= 8 and re.fullmatch(r"[X0-9]*", text):
        return text
    digits = re.sub(r"[^0-9]", "", text)
    return f"XXXX{digits[-4:]}" if digits else ""


def _account_type(text: str) -> str:
    return text[:MAX_ACCOUNT_TYPE_LENGTH]
