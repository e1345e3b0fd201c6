"""The payment gateway's consumer of its own provider notifications (webhooks).

`HandleProviderWebhook` verifies a notification's signature, records it once per notification
id and enqueues it (outbox, routing key `NOTIFICATION_RECEIVED`, payload the request as
received, headers left out). This consumer, the kit's `EventConsumer` on the service's queue
(`<db_prefix>payment_gateway.events`, with its inbox and parking queue), processes it in a
transaction on the merchant's database:

1. the transaction the notification names is fetched from the provider first: a notification
   says what happened, the transaction's details say where it stands now;
2. the payment is found by its reference at the provider (`invoiceNumber`), or, for a refund
   that carries none, by the transaction it gives money back from, and its row locked;
3. the notification becomes domain events: the outcome of the payment's pending PURCHASE,
   AUTHORIZE, CAPTURE or VOID when it reports that (so a webhook may settle a call before its
   answer arrives, or one whose answer was lost), otherwise what was done at the provider
   (a review's decision, a capture, void or refund made in its dashboard, a chargeback). A
   report of what is recorded already changes nothing;
4. the events are applied and recorded with their audit rows, and the payment events they
   announce are written to the outbox; the relay is told after the commit.

What becomes of a notification that cannot be applied (see `tally_kit.events.consumer`):
- retried: the payment's call in flight (PAYMENT_BUSY) or unknown (PAYMENT_OUTCOME_UNKNOWN),
  a report of a later step arriving before the earlier one (a refund or chargeback before the
  capture, a capture before the review's approval: ABORTED, EARLIER_STEP_NOT_RECORDED), and
  the provider being unreachable;
- parked: a notification no retry can apply (ILLEGAL_TRANSITION, amounts the payment cannot
  take, a transaction the provider does not know).
A notification about a transaction that is not one of the merchant's Tally payments (made in
the provider's dashboard for something else) is recorded as such and acknowledged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime

import asyncpg
from google.protobuf.message import Message
from tally.common.v1.event_pb2 import EventEnvelope
from tally.payment_gateway.v1 import payment_gateway_service_pb2 as api
from tally_kit import context
from tally_kit.db import MerchantDirectory
from tally_kit.errors import Aborted, FailedPrecondition, FieldViolation, InvalidArgument, RuleViolation
from tally_kit.events import EventConsumer, Handler
from tally_kit.settings import ServiceSettings
from tally_kit.uow import RelayNotifier, Transaction

from tally_payment_gateway import mapping, store, webhooks
from tally_payment_gateway.domain import (
    DECLINED,
    REVIEW_DECLINED,
    Approved,
    Change,
    ChargedBack,
    Event,
    Operation,
    Payment,
    PaymentState,
    ProviderCaptured,
    ProviderRefunded,
    ProviderVoided,
    ReviewApproved,
    ReviewDeclined,
)
from tally_payment_gateway.provider import (
    PaymentProvider,
    TransactionDetails,
    TransactionKind,
    TransactionStatus,
)
from tally_payment_gateway.store import PRODUCER
from tally_payment_gateway.webhooks import Notification

log = logging.getLogger(__name__)

# The routing key of a received notification. Not `payment.*`: it is the gateway's own work
# queue, never an event other services consume.
NOTIFICATION_RECEIVED = "payment-gateway.notification_received"
# The consumer's name without the run's prefix: queues `payment_gateway.events` and
# `payment_gateway.parking`.
CONSUMER = "payment_gateway"

# Refusals that end once the payment's call is settled: worth retrying.
_WAIT_FOR_CALL = frozenset({"PAYMENT_BUSY", "PAYMENT_OUTCOME_UNKNOWN"})
_FIRST_OPERATIONS = frozenset({Operation.PURCHASE, Operation.AUTHORIZE})
_CHARGE_EVENT_TYPES = frozenset(
    {
        webhooks.AUTH_CAPTURE_CREATED,
        webhooks.AUTHORIZATION_CREATED,
        webhooks.FRAUD_HELD,
        webhooks.FRAUD_APPROVED,
        webhooks.FRAUD_DECLINED,
    }
)
_CAPTURE_EVENT_TYPES = frozenset({webhooks.CAPTURE_CREATED, webhooks.PRIOR_AUTH_CAPTURE_CREATED})
# The states a payment is still in when a report of a later step arrives before the report of
# the step before it (its capture, or its review's approval).
_BEFORE_CAPTURE = frozenset({PaymentState.PENDING, PaymentState.AUTHORIZED})
_BEFORE_APPROVAL = frozenset({PaymentState.PENDING})

Clock = Callable[[], datetime]


class NotificationHandler:
    """Applies provider notifications to payments (see the module docstring)."""

    def __init__(self, provider: PaymentProvider, *, clock: Clock, producer: str = PRODUCER) -> None:
        self._provider = provider
        self._clock = clock
        self._producer = producer

    def handlers(self) -> Mapping[str, Handler]:
        return {NOTIFICATION_RECEIVED: self.notification_received}

    async def notification_received(
        self, conn: asyncpg.Connection, envelope: EventEnvelope, payload: Message
    ) -> None:
        if not isinstance(payload, api.HandleProviderWebhookRequest):
            raise InvalidArgument(
                [
                    FieldViolation(
                        "payload", f"must be a {api.HandleProviderWebhookRequest.DESCRIPTOR.full_name}"
                    )
                ]
            )
        merchant_id = envelope.merchant_id
        if payload.merchant_id != merchant_id:
            raise InvalidArgument([FieldViolation("merchant_id", "must be the envelope's merchant")])
        notification = webhooks.parse_notification(payload.body.data)
        outcome = await self._apply(conn, merchant_id, notification, envelope.correlation_id)
        await store.finish_notification(
            conn, merchant_id, notification.notification_id, outcome, self._clock()
        )
        log.info(
            "provider notification %s (%s): %s",
            notification.notification_id,
            notification.event_type,
            outcome,
            extra={"notification_id": notification.notification_id, "transaction_id": notification.entity_id},
        )

    async def _apply(
        self, conn: asyncpg.Connection, merchant_id: str, notification: Notification, correlation_id: str
    ) -> str:
        details = await self._provider.transaction_details(merchant_id, notification.entity_id)
        if details is None:
            raise FailedPrecondition(
                f"the provider has no transaction {notification.entity_id}",
                reason="TRANSACTION_NOT_FOUND",
                metadata={"transaction_id": notification.entity_id},
            )
        payment = await _payment_of(conn, merchant_id, details)
        if payment is None:
            return "not_a_tally_payment"
        try:
            events = _events(payment, notification, details)
        except RuleViolation as error:
            raise FailedPrecondition(
                f"an amount the provider reports for transaction {details.transaction_id} {error}",
                reason="PROVIDER_AMOUNT_INVALID",
                metadata={"transaction_id": details.transaction_id},
            ) from None
        if not events:
            return "unchanged"
        if payment.pending is not None:
            # The notification settles (or waits for) the payment's call: its story goes on
            # under the call's correlation id, events included.
            correlation_id = await store.call_correlation_id(conn, payment) or correlation_id
            context.correlation_id.set(correlation_id)
        change = Change(f"provider:{payment.provider}", correlation_id, self._clock())
        tx = Transaction(conn, merchant_id=merchant_id, producer=self._producer)
        try:
            after = await store.apply(tx, payment, events, change)
        except FailedPrecondition as refusal:
            if refusal.reason in _WAIT_FOR_CALL:
                raise Aborted(refusal.message, reason=refusal.reason, metadata=refusal.metadata) from refusal
            raise
        return "unchanged" if after == payment else "applied"


async def _payment_of(
    conn: asyncpg.Connection, merchant_id: str, details: TransactionDetails
) -> Payment | None:
    """The merchant's payment the transaction belongs to, its row locked; None when none does."""
    if details.order_reference:
        payment = await store.find_payment_by_order_reference(
            conn, merchant_id, details.order_reference, lock=True
        )
        if payment is not None:
            return payment
    if details.kind is TransactionKind.REFUND and details.reference_transaction_id:
        return await store.find_payment_by_provider_reference(
            conn, merchant_id, details.reference_transaction_id, lock=True
        )
    return None


def _events(payment: Payment, notification: Notification, details: TransactionDetails) -> Sequence[Event]:
    """What the notification changes in the payment, given where its transaction stands now."""
    pending = payment.pending
    event_type = notification.event_type
    if event_type in _CHARGE_EVENT_TYPES:
        if pending is not None and pending.operation in _FIRST_OPERATIONS:
            declined_code = REVIEW_DECLINED if event_type == webhooks.FRAUD_DECLINED else DECLINED
            return mapping.charge_events(payment, details, declined_code=declined_code)
        if event_type == webhooks.FRAUD_APPROVED:
            return [ReviewApproved()]
        if event_type == webhooks.FRAUD_DECLINED:
            return [ReviewDeclined(details.provider_status)]
        # The charge's creation (or its hold), recorded when the call was answered.
        return []
    if event_type in _CAPTURE_EVENT_TYPES:
        if pending is not None and pending.operation is Operation.CAPTURE:
            return (
                [Approved(payment.provider_reference)]
                if details.status is TransactionStatus.COMPLETED
                else []
            )
        _not_before(payment, _BEFORE_APPROVAL, "the capture", "the review's approval")
        return [ProviderCaptured(mapping.amount_minor(details.settled_amount, payment.currency))]
    if event_type == webhooks.VOID_CREATED:
        if details.kind is TransactionKind.REFUND:
            log.warning(
                "refund %s of payment %s was voided at the provider; the payment keeps the refund",
                details.transaction_id,
                payment.payment_id,
            )
            return []
        if pending is not None and pending.operation is Operation.VOID:
            return (
                [Approved(payment.provider_reference)] if details.status is TransactionStatus.VOIDED else []
            )
        _not_before(payment, _BEFORE_APPROVAL, "the void", "the review's approval")
        return [ProviderVoided(mapping.provider_refund_id(payment.merchant_id, details.transaction_id))]
    if event_type == webhooks.REFUND_CREATED:
        _not_before(payment, _BEFORE_CAPTURE, "the refund", "the capture")
        return [
            ProviderRefunded(
                refund_id=mapping.provider_refund_id(payment.merchant_id, details.transaction_id),
                provider_reference=details.transaction_id,
                amount_minor=mapping.amount_minor(details.settled_amount, payment.currency),
            )
        ]
    if event_type == webhooks.CHARGEBACK_CREATED:
        _not_before(payment, _BEFORE_CAPTURE, "the chargeback", "the capture")
        if not notification.dispute_id or notification.auth_amount is None:
            raise InvalidArgument(
                [FieldViolation("body.payload", "a chargeback names its disputeId and authAmount")]
            )
        return [
            ChargedBack(
                notification.dispute_id, mapping.amount_minor(notification.auth_amount, payment.currency)
            )
        ]
    return []


def _not_before(
    payment: Payment, earlier_states: frozenset[PaymentState], step: str, earlier_step: str
) -> None:
    """Retry a report of `step` while the payment still waits for `earlier_step` to be reported."""
    if payment.pending is None and payment.state in earlier_states:
        raise Aborted(
            f"{step} of payment {payment.payment_id} arrived before {earlier_step}",
            reason="EARLIER_STEP_NOT_RECORDED",
            metadata={"payment_id": str(payment.payment_id), "state": payment.state.value},
        )


def consumer_name(settings: ServiceSettings) -> str:
    """The consumer's queue prefix: stacks (and test runs) sharing a broker keep their queues
    apart by their database prefix, as they keep their databases apart."""
    return f"{settings.db_prefix}{CONSUMER}"


def build_consumer(
    settings: ServiceSettings,
    directory: MerchantDirectory,
    relay: RelayNotifier,
    provider: PaymentProvider,
    *,
    prepare_merchant: Callable[[str], Awaitable[object]],
    clock: Clock,
    retry_backoff_seconds: float = 0.5,
    retry_backoff_max_seconds: float = 30.0,
) -> EventConsumer:
    """The notification consumer; `start()` it after the directory and relay, `stop()` it before."""
    return EventConsumer(
        settings,
        directory,
        service=consumer_name(settings),
        handlers=NotificationHandler(provider, clock=clock).handlers(),
        prepare_merchant=prepare_merchant,
        # The payment events a notification produced are published right after the commit.
        after_commit=relay.notify,
        retry_backoff_seconds=retry_backoff_seconds,
        retry_backoff_max_seconds=retry_backoff_max_seconds,
    )
