"""The ledger's consumer of payment events: a captured payment settles its order's purchase, a
refund revokes the lot's credits left, a chargeback the lot's full value.

Each event is turned into the request of the RPC that does the same thing (`SettlePurchase`,
`ApplyRefund`, `ApplyChargeback`), checked by the same validation and applied by the same
service-layer operation, so an order paid through Tally's gateway is settled exactly as one
an upstream application settles itself. The kit's `EventConsumer` runs each handler in a
transaction on the event's merchant database that also records the event id (inbox), and
acknowledges the message after the commit; the relay is then told to publish the events the
handler wrote to the outbox.

The event's merchant gets its ledger database on first sight if the catalog knows it
(`MerchantGate.ensure`); an unknown merchant is parked (MERCHANT_NOT_FOUND).

What becomes of a failing event (see `tally_kit.events.consumer`): an event no retry can
apply (malformed, unknown product, a settlement contradicting an earlier one) is parked at
once and the next ones keep flowing; the catalog being unavailable is retried. A refund or
chargeback of an order the ledger has not settled yet is retried too (ABORTED,
ORDER_NOT_SETTLED_YET): the capture may still be on its way, or waiting for its own retry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

import asyncpg
from google.protobuf.message import Message
from tally.common.v1.event_pb2 import EventEnvelope
from tally.ledger.v1 import ledger_service_pb2 as api
from tally.payment_gateway.v1 import events_pb2 as payment_events
from tally_kit.db import MerchantDirectory
from tally_kit.errors import Aborted, FieldViolation, InvalidArgument, NotFound
from tally_kit.events import EventConsumer, Handler
from tally_kit.settings import ServiceSettings
from tally_kit.uow import RelayNotifier, Transaction

from tally_ledger import events, validation
from tally_ledger.services import Ledger, MerchantGate

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

# The consumer's name: its queue is `ledger.events`, its parking queue `ledger.parking`.
SERVICE = "ledger"
PRODUCER = "ledger"


class PaymentEventHandlers:
    """One handler per payment event type, over the service layer."""

    def __init__(self, ledger: Ledger, *, producer: str = PRODUCER) -> None:
        self._ledger = ledger
        self._producer = producer

    def handlers(self) -> Mapping[str, Handler]:
        return {
            events.PAYMENT_CAPTURED: self.payment_captured,
            events.PAYMENT_REFUNDED: self.payment_refunded,
            events.PAYMENT_CHARGEBACK: self.payment_chargeback,
        }

    async def payment_captured(
        self, conn: asyncpg.Connection, envelope: EventEnvelope, payload: Message
    ) -> None:
        captured = _expect(payload, payment_events.PaymentCaptured)
        command = validation.settle_purchase(
            api.SettlePurchaseRequest(
                merchant_id=captured.merchant_id,
                request_id=envelope.event_id,
                order_id=captured.order_id,
                user_id=captured.user_id,
                product_id=captured.product_id,
                amount_paid=captured.amount if captured.HasField("amount") else None,
                provider_reference=captured.provider_reference,
                payment_id=captured.payment_id,
            )
        )
        _ensure_same_merchant(envelope, command.merchant_id)
        issued = await self._ledger.settle_purchase(
            self._transaction(conn, envelope), command.merchant_id, command.order
        )
        log.info(
            "payment %s captured: order %s settled with lot %s",
            captured.payment_id,
            command.order.order_id,
            issued.lot.lot_id,
            extra={"event_id": envelope.event_id, "order_id": command.order.order_id},
        )

    async def payment_refunded(
        self, conn: asyncpg.Connection, envelope: EventEnvelope, payload: Message
    ) -> None:
        refunded = _expect(payload, payment_events.PaymentRefunded)
        command = validation.apply_refund(
            api.ApplyRefundRequest(
                merchant_id=refunded.merchant_id,
                request_id=envelope.event_id,
                order_id=refunded.order_id,
                refund_reference=refunded.refund_id,
                amount_refunded=refunded.refunded_amount if refunded.HasField("refunded_amount") else None,
            )
        )
        _ensure_same_merchant(envelope, command.merchant_id)
        tx = self._transaction(conn, envelope)
        with _order_settled_later(command.refund.order_id):
            reversed_ = await self._ledger.apply_refund(tx, command.merchant_id, command.refund)
        log.info(
            "payment %s refunded (%s): %s credits of lot %s revoked",
            refunded.payment_id,
            command.refund.reference,
            reversed_.credits_revoked,
            reversed_.lot.lot_id,
            extra={"event_id": envelope.event_id, "order_id": command.refund.order_id},
        )

    async def payment_chargeback(
        self, conn: asyncpg.Connection, envelope: EventEnvelope, payload: Message
    ) -> None:
        charged_back = _expect(payload, payment_events.PaymentChargeback)
        command = validation.apply_chargeback(
            api.ApplyChargebackRequest(
                merchant_id=charged_back.merchant_id,
                request_id=envelope.event_id,
                order_id=charged_back.order_id,
                chargeback_reference=charged_back.chargeback_id,
                amount=charged_back.chargeback_amount if charged_back.HasField("chargeback_amount") else None,
            )
        )
        _ensure_same_merchant(envelope, command.merchant_id)
        tx = self._transaction(conn, envelope)
        with _order_settled_later(command.chargeback.order_id):
            reversed_ = await self._ledger.apply_chargeback(tx, command.merchant_id, command.chargeback)
        log.info(
            "payment %s charged back (%s): %s credits of lot %s revoked",
            charged_back.payment_id,
            command.chargeback.reference,
            reversed_.credits_revoked,
            reversed_.lot.lot_id,
            extra={"event_id": envelope.event_id, "order_id": command.chargeback.order_id},
        )

    def _transaction(self, conn: asyncpg.Connection, envelope: EventEnvelope) -> Transaction:
        return Transaction(conn, merchant_id=envelope.merchant_id, producer=self._producer)


def build_consumer(
    settings: ServiceSettings,
    directory: MerchantDirectory,
    ledger: Ledger,
    merchants: MerchantGate,
    relay: RelayNotifier,
    *,
    service: str = SERVICE,
) -> EventConsumer:
    """The payment-event consumer; `start()` it after the directory and relay, `stop()` it
    before them. `service` names its queues (tests use a name of their own)."""
    return EventConsumer(
        settings,
        directory,
        service=service,
        handlers=PaymentEventHandlers(ledger).handlers(),
        prepare_merchant=merchants.ensure,
        after_commit=relay.notify,
    )


def _expect(payload: Message, message_type: type[M]) -> M:
    # The routing key and the payload type travel separately; a publisher mixing them up
    # sent something no retry can apply.
    if not isinstance(payload, message_type):
        raise InvalidArgument(
            [
                FieldViolation(
                    "payload",
                    f"must be a {message_type.DESCRIPTOR.full_name}, not {payload.DESCRIPTOR.full_name}",
                )
            ]
        )
    return payload


def _ensure_same_merchant(envelope: EventEnvelope, merchant_id: str) -> None:
    # The transaction is on the envelope's merchant database: the payload must be about it.
    if merchant_id != envelope.merchant_id:
        raise InvalidArgument(
            [FieldViolation("merchant_id", f"must be the envelope's merchant {envelope.merchant_id!r}")]
        )


@contextmanager
def _order_settled_later(order_id: str) -> Iterator[None]:
    """Turns ORDER_NOT_FOUND into a retry: the order's capture may not be applied yet."""
    try:
        yield
    except NotFound as missing:
        if missing.reason != "ORDER_NOT_FOUND":
            raise
        raise Aborted(
            f"order {order_id} is not settled yet; its capture may still be on its way",
            reason="ORDER_NOT_SETTLED_YET",
            metadata={"order_id": order_id},
        ) from missing
