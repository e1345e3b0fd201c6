"""Routing keys (`EventEnvelope.event_type`) of the events the payment gateway publishes, and the
message each of the domain's notices becomes.

The ledger consumes `payment.captured` (settles the order's purchase), `payment.refunded` and
`payment.chargeback`; `payment.voided` and `payment.failed` tell the upstream application that
an order will not be paid by that payment. Payloads are in `tally/payment_gateway/v1/events.proto`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from tally.common.v1 import money_pb2
from tally.payment_gateway.v1 import events_pb2

from tally_payment_gateway.domain import Notice, NoticeKind, Payment

PAYMENT_CAPTURED = "payment.captured"
PAYMENT_REFUNDED = "payment.refunded"
PAYMENT_CHARGEBACK = "payment.chargeback"
PAYMENT_VOIDED = "payment.voided"
PAYMENT_FAILED = "payment.failed"

# The payload message of each event type, for consumers decoding an envelope.
PAYLOAD_TYPES: Mapping[str, type[Message]] = {
    PAYMENT_CAPTURED: events_pb2.PaymentCaptured,
    PAYMENT_REFUNDED: events_pb2.PaymentRefunded,
    PAYMENT_CHARGEBACK: events_pb2.PaymentChargeback,
    PAYMENT_VOIDED: events_pb2.PaymentVoided,
    PAYMENT_FAILED: events_pb2.PaymentFailed,
}

ROUTING_KEYS: Mapping[NoticeKind, str] = {
    NoticeKind.CAPTURED: PAYMENT_CAPTURED,
    NoticeKind.REFUNDED: PAYMENT_REFUNDED,
    NoticeKind.CHARGED_BACK: PAYMENT_CHARGEBACK,
    NoticeKind.VOIDED: PAYMENT_VOIDED,
    NoticeKind.FAILED: PAYMENT_FAILED,
}


def event_for(payment: Payment, notice: Notice) -> tuple[str, Message]:
    """The routing key and payload announcing `notice`, from the payment as the change left it."""
    order = {
        "merchant_id": payment.merchant_id,
        "user_id": payment.user_id,
        "order_id": payment.order_id,
        "product_id": payment.product_id,
        "payment_id": str(payment.payment_id),
    }
    captured = _money(payment, payment.captured_minor)
    payload: Message
    match notice.kind:
        case NoticeKind.CAPTURED:
            payload = events_pb2.PaymentCaptured(
                **order,
                amount=captured,
                provider_reference=payment.provider_reference,
                capture_time=_timestamp(notice.at),
            )
        case NoticeKind.REFUNDED:
            refund = notice.refund
            if refund is None or refund not in payment.refunds:
                raise ValueError("a refund notice names one of the payment's refunds")
            refunds_so_far = payment.refunds[: payment.refunds.index(refund) + 1]
            payload = events_pb2.PaymentRefunded(
                **order,
                amount=captured,
                provider_reference=refund.provider_reference,
                refund_id=str(refund.refund_id),
                refunded_amount=_money(payment, refund.amount_minor),
                total_refunded=_money(payment, sum(r.amount_minor for r in refunds_so_far)),
                refund_time=_timestamp(notice.at),
            )
        case NoticeKind.CHARGED_BACK:
            chargeback = payment.chargeback
            if chargeback is None:
                raise ValueError("a chargeback notice follows the payment's chargeback")
            payload = events_pb2.PaymentChargeback(
                **order,
                amount=captured,
                provider_reference=payment.provider_reference,
                chargeback_id=chargeback.chargeback_id,
                chargeback_amount=_money(payment, chargeback.amount_minor),
                chargeback_time=_timestamp(notice.at),
            )
        case NoticeKind.VOIDED:
            payload = events_pb2.PaymentVoided(
                **order,
                amount=_money(payment, payment.amount_minor),
                provider_reference=payment.provider_reference,
                void_time=_timestamp(notice.at),
            )
        case NoticeKind.FAILED:
            payload = events_pb2.PaymentFailed(
                **order,
                amount=_money(payment, payment.amount_minor),
                provider_reference=payment.provider_reference,
                failure_code=payment.failure_code,
                failure_message=payment.failure_message,
                fail_time=_timestamp(notice.at),
            )
    return ROUTING_KEYS[notice.kind], payload


def _money(payment: Payment, amount_minor: int) -> money_pb2.Money:
    return money_pb2.Money(amount_minor=amount_minor, currency=payment.currency)


def _timestamp(instant: datetime) -> Timestamp:
    message = Timestamp()
    message.FromDatetime(instant)
    return message
