"""The ledger-event handlers on the real PostgreSQL, each event in a transaction as the consumer runs it.

The merchant's profile comes from a fixed source here; the integration tests read it from
the real catalog.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from datetime import UTC, datetime
from uuid import uuid4

import asyncpg
import pytest
from google.protobuf.message import Message
from tally.common.v1.money_pb2 import Money
from tally.ledger.v1 import events_pb2 as ledger_events
from tally.receipt.v1 import receipt_service_pb2 as api
from tally_kit.db import MerchantDirectory
from tally_kit.errors import Aborted, FailedPrecondition, InvalidArgument
from tally_kit.events import is_transient, make_envelope
from tally_receipt import store, validation
from tally_receipt.domain import Amounts, CreditNote, MerchantProfile, Receipt
from tally_receipt.handlers import LedgerEventHandlers

pytestmark = pytest.mark.integration

NOW = datetime(2034, 5, 6, 7, 8, 9, tzinfo=UTC)


class FixedProfiles:
    def __init__(self, profile: MerchantProfile) -> None:
        self.profile_of_merchant = profile

    async def profile(self, merchant_id: str) -> MerchantProfile:
        return self.profile_of_merchant


def settled(
    merchant_id: str, user_id: str, order_id: str, amount_minor: int = 1000
) -> ledger_events.PurchaseSettled:
    event = ledger_events.PurchaseSettled(
        merchant_id=merchant_id,
        user_id=user_id,
        order_id=order_id,
        product_id=str(uuid4()),
        product_name="Starter pack",
        amount_paid=Money(amount_minor=amount_minor, currency="EUR"),
        provider_reference="psp-1",
        lot_id=str(uuid4()),
    )
    event.credits.value = "100"
    event.settle_time.FromDatetime(NOW)
    return event


def refunded(
    merchant_id: str, user_id: str, order_id: str, amount_minor: int, reference: str | None = None
) -> ledger_events.RefundApplied:
    return ledger_events.RefundApplied(
        merchant_id=merchant_id,
        user_id=user_id,
        order_id=order_id,
        refund_reference=reference or f"refund-{secrets.token_hex(4)}",
        amount_refunded=Money(amount_minor=amount_minor, currency="EUR"),
    )


class Ledger:
    """Delivers ledger events to the handlers the way the consumer does."""

    def __init__(self, directory: MerchantDirectory, merchant_id: str, profile: MerchantProfile) -> None:
        self.directory = directory
        self.merchant_id = merchant_id
        self.handlers = LedgerEventHandlers(FixedProfiles(profile), clock=lambda: NOW).by_event_type()

    async def deliver(self, event_type: str, payload: Message) -> None:
        envelope = make_envelope(
            event_type=event_type, merchant_id=self.merchant_id, payload=payload, producer="ledger"
        )
        async with self.directory.transaction(self.merchant_id) as conn:
            await self.handlers[event_type](conn, envelope, payload)

    async def receipts_of(self, user_id: str) -> list[Receipt]:
        query = validation.list_receipts(
            api.ListReceiptsRequest(merchant_id=self.merchant_id, user_id=user_id)
        )
        async with self.directory.connection(self.merchant_id) as conn:
            return (await store.list_receipts(conn, self.merchant_id, user_id, query.page)).items

    async def credit_notes_of(self, receipt: Receipt) -> list[CreditNote]:
        async with self.directory.connection(self.merchant_id) as conn:
            return await store.credit_notes_of(conn, self.merchant_id, receipt.receipt_id)


@pytest.fixture
def ledger(directory: MerchantDirectory, merchant_id: str, profile: MerchantProfile) -> Ledger:
    return Ledger(directory, merchant_id, profile)


@pytest.fixture
def user_id() -> str:
    return f"user-{secrets.token_hex(4)}"


async def test_a_settled_purchase_gets_one_receipt(ledger: Ledger, user_id: str, series: str) -> None:
    event = settled(ledger.merchant_id, user_id, f"{user_id}-order-1", 1000)
    await ledger.deliver("ledger.purchase_settled", event)

    [receipt] = await ledger.receipts_of(user_id)
    assert receipt.order_id == f"{user_id}-order-1"
    assert receipt.number.text == f"{series}-2034-000001"
    assert receipt.issued_at == NOW
    assert receipt.settled_at == NOW
    assert receipt.totals == Amounts(net=833, tax=167, gross=1000)
    assert receipt.merchant.legal_name == "Acme SAS"
    assert str(receipt.lot_id) == event.lot_id


async def test_the_same_purchase_told_twice_gets_one_receipt(ledger: Ledger, user_id: str) -> None:
    # Two events (two event ids) for one order: the inbox cannot tell them apart, the order can.
    await ledger.deliver(
        "ledger.purchase_settled", settled(ledger.merchant_id, user_id, f"{user_id}-order-1")
    )
    await ledger.deliver(
        "ledger.purchase_settled", settled(ledger.merchant_id, user_id, f"{user_id}-order-1")
    )
    await ledger.deliver(
        "ledger.purchase_settled", settled(ledger.merchant_id, user_id, f"{user_id}-order-2")
    )

    receipts = await ledger.receipts_of(user_id)
    assert sorted(receipt.order_id for receipt in receipts) == [f"{user_id}-order-1", f"{user_id}-order-2"]
    assert sorted(receipt.number.sequence for receipt in receipts) == [1, 2]


async def test_an_order_that_paid_nothing_gets_no_receipt_and_takes_no_number(
    ledger: Ledger, user_id: str
) -> None:
    await ledger.deliver(
        "ledger.purchase_settled", settled(ledger.merchant_id, user_id, f"{user_id}-free-order", 0)
    )
    await ledger.deliver(
        "ledger.purchase_settled", settled(ledger.merchant_id, user_id, f"{user_id}-paid-order", 500)
    )

    [receipt] = await ledger.receipts_of(user_id)
    assert (receipt.order_id, receipt.number.sequence) == (f"{user_id}-paid-order", 1)


async def test_malformed_events_are_refused_with_every_bad_field(ledger: Ledger, user_id: str) -> None:
    event = settled("other-merchant", "", f"{user_id}-order-1", -5)
    event.ClearField("settle_time")
    event.amount_paid.currency = "EURO"
    with pytest.raises(InvalidArgument) as refused:
        await ledger.deliver("ledger.purchase_settled", event)
    fields = {violation.field for violation in refused.value.violations}
    assert fields == {
        "merchant_id",
        "user_id",
        "amount_paid.amount_minor",
        "amount_paid.currency",
        "settle_time",
    }
    assert not is_transient(refused.value)

    with pytest.raises(InvalidArgument) as wrong_payload:
        await ledger.deliver(
            "ledger.purchase_settled", refunded(ledger.merchant_id, user_id, f"{user_id}-order-1", 1)
        )
    assert wrong_payload.value.reason == "UNEXPECTED_PAYLOAD"
    assert await ledger.receipts_of(user_id) == []


async def test_a_refund_gets_a_credit_note_referring_to_the_receipt(
    ledger: Ledger, user_id: str, series: str
) -> None:
    await ledger.deliver(
        "ledger.purchase_settled", settled(ledger.merchant_id, user_id, f"{user_id}-order-1", 1000)
    )
    [receipt] = await ledger.receipts_of(user_id)

    await ledger.deliver(
        "ledger.refund_applied", refunded(ledger.merchant_id, user_id, f"{user_id}-order-1", 400, "r-1")
    )
    # The same refund told again issues nothing more.
    await ledger.deliver(
        "ledger.refund_applied", refunded(ledger.merchant_id, user_id, f"{user_id}-order-1", 400, "r-1")
    )
    await ledger.deliver(
        "ledger.refund_applied", refunded(ledger.merchant_id, user_id, f"{user_id}-order-1", 600, "r-2")
    )

    first, second = await ledger.credit_notes_of(receipt)
    assert (first.receipt_id, first.receipt_number) == (receipt.receipt_id, receipt.number.text)
    assert [first.number.text, second.number.text] == [f"{series}-2034-CN000001", f"{series}-2034-CN000002"]
    assert [first.refund_reference, second.refund_reference] == ["r-1", "r-2"]
    # 167 * 400 / 1000 = 66.8 -> 67, then the rest of the receipt's tax.
    assert first.amounts == Amounts(net=333, tax=67, gross=400)
    assert second.amounts == Amounts(net=500, tax=100, gross=600)
    assert first.amounts + second.amounts == receipt.totals


async def test_a_refund_before_its_receipt_is_retried_later(ledger: Ledger, user_id: str) -> None:
    with pytest.raises(Aborted) as waiting:
        await ledger.deliver(
            "ledger.refund_applied", refunded(ledger.merchant_id, user_id, f"{user_id}-order-1", 100)
        )
    assert waiting.value.reason == "RECEIPT_NOT_YET_ISSUED"
    assert is_transient(waiting.value)


async def test_a_refund_beyond_the_receipt_is_refused_and_takes_no_number(
    ledger: Ledger, user_id: str, series: str
) -> None:
    await ledger.deliver(
        "ledger.purchase_settled", settled(ledger.merchant_id, user_id, f"{user_id}-order-1", 1000)
    )
    [receipt] = await ledger.receipts_of(user_id)
    await ledger.deliver(
        "ledger.refund_applied", refunded(ledger.merchant_id, user_id, f"{user_id}-order-1", 700)
    )
    with pytest.raises(FailedPrecondition) as refused:
        await ledger.deliver(
            "ledger.refund_applied", refunded(ledger.merchant_id, user_id, f"{user_id}-order-1", 301)
        )
    assert refused.value.reason == "CREDIT_EXCEEDS_RECEIPT"
    await ledger.deliver(
        "ledger.refund_applied", refunded(ledger.merchant_id, user_id, f"{user_id}-order-1", 300)
    )

    notes = await ledger.credit_notes_of(receipt)
    assert [note.number.sequence for note in notes] == [1, 2]
    assert sum(note.amounts.gross for note in notes) == 1000


async def test_concurrent_refunds_of_one_receipt_never_credit_more_than_it(
    ledger: Ledger, user_id: str, series: str
) -> None:
    await ledger.deliver(
        "ledger.purchase_settled", settled(ledger.merchant_id, user_id, f"{user_id}-order-1", 1000)
    )
    [receipt] = await ledger.receipts_of(user_id)

    outcomes = await asyncio.gather(
        *(
            ledger.deliver(
                "ledger.refund_applied", refunded(ledger.merchant_id, user_id, f"{user_id}-order-1", 150)
            )
            for _ in range(8)
        ),
        return_exceptions=True,
    )

    refused = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(refused) == 2
    assert all(isinstance(error, FailedPrecondition) for error in refused)
    notes = await ledger.credit_notes_of(receipt)
    assert sorted(note.number.sequence for note in notes) == [1, 2, 3, 4, 5, 6]
    assert sum(note.amounts.gross for note in notes) == 900


async def test_the_schema_refuses_credit_beyond_the_receipt(
    directory: MerchantDirectory, ledger: Ledger, user_id: str, series: str
) -> None:
    await ledger.deliver(
        "ledger.purchase_settled", settled(ledger.merchant_id, user_id, f"{user_id}-order-1", 1000)
    )
    [receipt] = await ledger.receipts_of(user_id)
    await ledger.deliver(
        "ledger.refund_applied", refunded(ledger.merchant_id, user_id, f"{user_id}-order-1", 1000, "full")
    )
    [note] = await ledger.credit_notes_of(receipt)

    with pytest.raises(asyncpg.CheckViolationError, match="would credit"):
        async with directory.transaction(ledger.merchant_id) as conn:
            allocation = await store.allocate_number(conn, ledger.merchant_id, note.number.kind, series, NOW)
            extra = dataclasses.replace(
                note,
                credit_note_id=uuid4(),
                refund_reference="forged",
                number=allocation.number,
                issued_at=allocation.issued_at,
                amounts=Amounts(net=1, tax=0, gross=1),
            )
            await store.insert_credit_note(conn, extra)
