"""Events and requests -> domain inputs.

Each function reads one message, collects every bad field (paths as in the proto, e.g.
`amount_paid.currency`) and raises one InvalidArgument naming them all. A request refused
here never reaches a database; an event refused here is malformed, which no retry can
mend, so the consumer parks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from tally.common.v1 import money_pb2
from tally.common.v1.event_pb2 import EventEnvelope
from tally.ledger.v1 import events_pb2 as ledger_events
from tally.receipt.v1 import receipt_service_pb2 as api
from tally_kit import amounts
from tally_kit.amounts import Money
from tally_kit.errors import RuleViolation, Violations
from tally_kit.pagination import PageRequest, read_page_request
from tally_kit.text import check_text

from tally_receipt.domain import Purchase, Refund

# The ledger's identifiers, as its API defines them.
USER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
ORDER_ID_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")
MAX_PRODUCT_NAME_LENGTH = 200
MAX_PROVIDER_REFERENCE_LENGTH = 200
MAX_PAYMENT_ID_LENGTH = 128
MAX_REFUND_REFERENCE_LENGTH = 200


@dataclass(frozen=True)
class ReceiptRef:
    merchant_id: str
    receipt_id: UUID


@dataclass(frozen=True)
class CreditNoteRef:
    merchant_id: str
    credit_note_id: UUID


@dataclass(frozen=True)
class ListReceipts:
    merchant_id: str
    user_id: str
    page: PageRequest


# --- events ---------------------------------------------------------------------------------


def purchase(envelope: EventEnvelope, event: ledger_events.PurchaseSettled) -> Purchase:
    violations = Violations()
    _same_merchant(violations, envelope, event.merchant_id)
    _pattern(violations, "user_id", event.user_id, USER_ID_PATTERN)
    _pattern(violations, "order_id", event.order_id, ORDER_ID_PATTERN)
    _uuid(violations, "product_id", event.product_id)
    _text(violations, "product_name", event.product_name, MAX_PRODUCT_NAME_LENGTH)
    amount_paid = _money(violations, "amount_paid", event, minimum=0)
    _text(violations, "provider_reference", event.provider_reference, MAX_PROVIDER_REFERENCE_LENGTH)
    if event.payment_id:
        _text(violations, "payment_id", event.payment_id, MAX_PAYMENT_ID_LENGTH)
    _uuid(violations, "lot_id", event.lot_id)
    settled_at = None
    if violations.require(event.HasField("settle_time"), "settle_time", "is required"):
        settled_at = event.settle_time.ToDatetime(tzinfo=UTC)
    violations.raise_if_any()
    assert amount_paid is not None and settled_at is not None
    return Purchase(
        merchant_id=event.merchant_id,
        user_id=event.user_id,
        order_id=event.order_id,
        product_id=event.product_id,
        product_name=event.product_name,
        amount_paid=amount_paid,
        payment_id=event.payment_id,
        provider_reference=event.provider_reference,
        lot_id=event.lot_id,
        settled_at=settled_at,
    )


def refund(envelope: EventEnvelope, event: ledger_events.RefundApplied) -> Refund:
    violations = Violations()
    _same_merchant(violations, envelope, event.merchant_id)
    _pattern(violations, "user_id", event.user_id, USER_ID_PATTERN)
    _pattern(violations, "order_id", event.order_id, ORDER_ID_PATTERN)
    _text(violations, "refund_reference", event.refund_reference, MAX_REFUND_REFERENCE_LENGTH)
    amount_refunded = _money(violations, "amount_refunded", event, minimum=1)
    violations.raise_if_any()
    assert amount_refunded is not None
    return Refund(
        merchant_id=event.merchant_id,
        user_id=event.user_id,
        order_id=event.order_id,
        refund_reference=event.refund_reference,
        amount_refunded=amount_refunded,
    )


# --- requests -------------------------------------------------------------------------------


def receipt_ref(request: api.GetReceiptRequest | api.RenderReceiptPdfRequest) -> ReceiptRef:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    receipt_id = _uuid(violations, "receipt_id", request.receipt_id)
    violations.raise_if_any()
    assert receipt_id is not None
    return ReceiptRef(merchant_id=request.merchant_id, receipt_id=receipt_id)


def credit_note_ref(request: api.RenderCreditNotePdfRequest) -> CreditNoteRef:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    credit_note_id = _uuid(violations, "credit_note_id", request.credit_note_id)
    violations.raise_if_any()
    assert credit_note_id is not None
    return CreditNoteRef(merchant_id=request.merchant_id, credit_note_id=credit_note_id)


def list_receipts(request: api.ListReceiptsRequest) -> ListReceipts:
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    _pattern(violations, "user_id", request.user_id, USER_ID_PATTERN)
    page = read_page_request(
        violations,
        page_size=request.page_size,
        page_token=request.page_token,
        scope={"list": "receipts", "merchant_id": request.merchant_id, "user_id": request.user_id},
        key=(datetime, UUID),
    )
    violations.raise_if_any()
    return ListReceipts(merchant_id=request.merchant_id, user_id=request.user_id, page=page)


# --- fields ---------------------------------------------------------------------------------


def _same_merchant(violations: Violations, envelope: EventEnvelope, merchant_id: str) -> None:
    if merchant_id != envelope.merchant_id:
        violations.add("merchant_id", f"must be the envelope's merchant {envelope.merchant_id!r}")


def _pattern(violations: Violations, field: str, value: str, pattern: re.Pattern[str]) -> None:
    if not value:
        violations.add(field, "is required")
    elif not pattern.fullmatch(value):
        violations.add(field, f"must match {pattern.pattern}")


def _uuid(violations: Violations, field: str, value: str) -> UUID | None:
    if not value:
        violations.add(field, "is required")
        return None
    try:
        return UUID(value)
    except ValueError:
        violations.add(field, "must be a UUID")
        return None


def _text(violations: Violations, field: str, value: str, max_length: int) -> None:
    try:
        check_text(value, max_length)
    except RuleViolation as violation:
        violations.add(field, str(violation))


def _money(
    violations: Violations,
    field: str,
    event: ledger_events.PurchaseSettled | ledger_events.RefundApplied,
    *,
    minimum: int,
) -> Money | None:
    if not event.HasField(field):
        violations.add(field, "is required")
        return None
    money: money_pb2.Money = getattr(event, field)
    valid = True
    try:
        amounts.check_currency(money.currency)
    except RuleViolation as violation:
        violations.add(f"{field}.currency", str(violation))
        valid = False
    if money.amount_minor < minimum:
        violations.add(f"{field}.amount_minor", f"must be at least {minimum}")
        valid = False
    return Money(amount_minor=money.amount_minor, currency=money.currency) if valid else None
