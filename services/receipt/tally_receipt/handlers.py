"""Event handlers: a receipt for every settled purchase that paid, a credit note for every refund.

Each handler runs inside the event consumer's transaction on the merchant's database (see
`tally_kit.events.consumer`): the document, its number, its outbox event and the inbox
record of the ledger event commit together or not at all.

- `ledger.purchase_settled`: one receipt per order. The ledger publishes the event once per
  order; a second event for an order that already has its receipt issues nothing (the
  unique order constraint backs this up if two race). An order that paid nothing gets no
  receipt (`domain.needs_receipt`); grants never arrive as purchases.
- `ledger.refund_applied`: one credit note per refund reference, referring to the order's
  receipt. A refund whose receipt is not there yet (its purchase event is still on its way)
  is retried later. One that would credit more than the receipt, or in another currency,
  is parked.

The merchant's profile (legal details, series prefix, tax regime) is read from the catalog
before any lock is taken, so that a slow catalog never holds up other issuers of the series.
A malformed event is refused with InvalidArgument, which parks it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TypeVar
from uuid import uuid4

import asyncpg
from google.protobuf.message import Message
from prometheus_client import Counter
from tally.common.v1.event_pb2 import EventEnvelope
from tally.ledger.v1 import events_pb2 as ledger_events
from tally.receipt.v1 import events_pb2
from tally_kit.errors import Aborted, FieldViolation, InvalidArgument
from tally_kit.events import Handler, enqueue

from tally_receipt import domain, events, mapping, store, validation
from tally_receipt.catalog_client import MerchantProfiles
from tally_receipt.domain import CreditNote, DocumentKind, MerchantProfile, Purchase, Receipt, Refund

log = logging.getLogger(__name__)

PRODUCER = "receipt"

Clock = Callable[[], datetime]
M = TypeVar("M", bound=Message)

documents_issued = Counter(
    "tally_receipt_documents_issued_total", "Receipts and credit notes issued, by kind.", ("kind",)
)
purchases_without_receipt = Counter(
    "tally_receipt_purchases_without_receipt_total",
    "Purchase-settled events that issued no receipt, by reason: the order already had its "
    "receipt (duplicate) or paid nothing (nothing_paid).",
    ("reason",),
)


def utc_now() -> datetime:
    return datetime.now(UTC)


async def issue_receipt(
    conn: asyncpg.Connection, purchase: Purchase, profile: MerchantProfile, *, now: datetime
) -> Receipt:
    """Numbers, stores and announces the purchase's receipt, in the caller's transaction."""
    allocation = await store.allocate_number(
        conn, purchase.merchant_id, DocumentKind.RECEIPT, profile.series_prefix, now
    )
    receipt = domain.new_receipt(
        purchase, profile, receipt_id=uuid4(), number=allocation.number, issued_at=allocation.issued_at
    )
    await store.insert_receipt(conn, receipt)
    await enqueue(
        conn,
        producer=PRODUCER,
        event_type=events.RECEIPT_ISSUED,
        merchant_id=receipt.merchant_id,
        payload=events_pb2.ReceiptIssued(receipt=mapping.receipt(receipt)),
    )
    return receipt


async def issue_credit_note(
    conn: asyncpg.Connection, receipt: Receipt, refund: Refund, profile: MerchantProfile, *, now: datetime
) -> CreditNote:
    """Numbers, stores and announces the refund's credit note, in the caller's transaction.

    The caller holds the receipt's row lock, so that the credit notes counted here are all
    there are.
    """
    earlier = await store.credit_notes_of(conn, receipt.merchant_id, receipt.receipt_id)
    credited_before = sum(note.amounts.gross for note in earlier)
    # Checked before a number is allocated, so that a refused refund takes none.
    domain.credit_note_amounts(receipt, credited_before, refund)
    allocation = await store.allocate_number(
        conn, receipt.merchant_id, DocumentKind.CREDIT_NOTE, profile.series_prefix, now
    )
    note = domain.new_credit_note(
        receipt,
        refund,
        credited_before=credited_before,
        merchant=profile.merchant,
        credit_note_id=uuid4(),
        number=allocation.number,
        issued_at=allocation.issued_at,
    )
    await store.insert_credit_note(conn, note)
    await enqueue(
        conn,
        producer=PRODUCER,
        event_type=events.CREDIT_NOTE_ISSUED,
        merchant_id=note.merchant_id,
        payload=events_pb2.CreditNoteIssued(credit_note=mapping.credit_note(note)),
    )
    return note


class LedgerEventHandlers:
    """The handlers of the ledger events the receipt service consumes."""

    def __init__(self, profiles: MerchantProfiles, *, clock: Clock = utc_now) -> None:
        self._profiles = profiles
        self._clock = clock

    def by_event_type(self) -> Mapping[str, Handler]:
        return {
            events.PURCHASE_SETTLED: self.on_purchase_settled,
            events.REFUND_APPLIED: self.on_refund_applied,
        }

    async def on_purchase_settled(
        self, conn: asyncpg.Connection, envelope: EventEnvelope, payload: Message
    ) -> None:
        purchase = validation.purchase(envelope, _expect(payload, ledger_events.PurchaseSettled))
        if not domain.needs_receipt(purchase):
            log.info("order %s paid nothing: no receipt", purchase.order_id)
            purchases_without_receipt.labels("nothing_paid").inc()
            return
        existing = await store.find_receipt_of_order(conn, purchase.merchant_id, purchase.order_id)
        if existing is not None:
            log.info("order %s already has receipt %s", purchase.order_id, existing.number.text)
            purchases_without_receipt.labels("duplicate").inc()
            return
        profile = await self._profiles.profile(purchase.merchant_id)
        receipt = await issue_receipt(conn, purchase, profile, now=self._clock())
        documents_issued.labels(DocumentKind.RECEIPT.value).inc()
        log.info("receipt %s issued for order %s", receipt.number.text, purchase.order_id)

    async def on_refund_applied(
        self, conn: asyncpg.Connection, envelope: EventEnvelope, payload: Message
    ) -> None:
        refund = validation.refund(envelope, _expect(payload, ledger_events.RefundApplied))
        existing = await store.find_credit_note_of_refund(conn, refund.merchant_id, refund.refund_reference)
        if existing is not None:
            log.info("refund %s already has credit note %s", refund.refund_reference, existing.number.text)
            return
        profile = await self._profiles.profile(refund.merchant_id)
        receipt = await store.find_receipt_of_order(conn, refund.merchant_id, refund.order_id, lock=True)
        if receipt is None:
            # Every refunded order paid something, so its receipt is on its way: the
            # purchase event is queued behind this one or being retried.
            raise Aborted(
                f"order {refund.order_id} has no receipt yet; its refund waits for it",
                reason="RECEIPT_NOT_YET_ISSUED",
            )
        note = await issue_credit_note(conn, receipt, refund, profile, now=self._clock())
        documents_issued.labels(DocumentKind.CREDIT_NOTE.value).inc()
        log.info("credit note %s issued against receipt %s", note.number.text, receipt.number.text)


def _expect(payload: Message, message_type: type[M]) -> M:
    if not isinstance(payload, message_type):
        raise InvalidArgument(
            [FieldViolation("payload", f"must be a {message_type.DESCRIPTOR.full_name}")],
            reason="UNEXPECTED_PAYLOAD",
        )
    return payload
