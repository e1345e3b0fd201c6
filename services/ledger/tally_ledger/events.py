"""Routing keys (`EventEnvelope.event_type`) of the events the ledger publishes and consumes.

Published: each names a message in `tally/ledger/v1/events.proto`. Consumed: the payment
gateway's events in `tally/payment_gateway/v1/events.proto`; a captured payment settles its
order's purchase, a refund revokes the lot's credits left, a chargeback its full value.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message
from tally.ledger.v1 import events_pb2
from tally.payment_gateway.v1 import events_pb2 as payment_events_pb2

PURCHASE_SETTLED = "ledger.purchase_settled"
LOT_ISSUED = "ledger.lot_issued"
OPERATION_CLOSED = "ledger.operation_closed"
LOT_EXPIRED = "ledger.lot_expired"
BALANCE_WENT_NEGATIVE = "ledger.balance_went_negative"
REFUND_APPLIED = "ledger.refund_applied"
CHARGEBACK_APPLIED = "ledger.chargeback_applied"

# The payload message of each event type the ledger publishes, for consumers decoding an
# envelope.
PAYLOAD_TYPES: Mapping[str, type[Message]] = {
    PURCHASE_SETTLED: events_pb2.PurchaseSettled,
    LOT_ISSUED: events_pb2.LotIssued,
    OPERATION_CLOSED: events_pb2.OperationClosed,
    LOT_EXPIRED: events_pb2.LotExpired,
    BALANCE_WENT_NEGATIVE: events_pb2.BalanceWentNegative,
    REFUND_APPLIED: events_pb2.RefundApplied,
    CHARGEBACK_APPLIED: events_pb2.ChargebackApplied,
}

PAYMENT_CAPTURED = "payment.captured"
PAYMENT_REFUNDED = "payment.refunded"
PAYMENT_CHARGEBACK = "payment.chargeback"

# The events the ledger's consumer binds its queue to, with their payload messages.
CONSUMED_PAYLOAD_TYPES: Mapping[str, type[Message]] = {
    PAYMENT_CAPTURED: payment_events_pb2.PaymentCaptured,
    PAYMENT_REFUNDED: payment_events_pb2.PaymentRefunded,
    PAYMENT_CHARGEBACK: payment_events_pb2.PaymentChargeback,
}
