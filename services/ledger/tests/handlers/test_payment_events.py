"""The ledger's payment-event consumer on the real RabbitMQ and PostgreSQL, beside the real
catalog: captures settle one lot each, duplicates change nothing, refunds and chargebacks
revoke, poison events are parked while the next ones are handled."""

from __future__ import annotations

import secrets
import uuid
from decimal import Decimal

import pytest
from handler_support import Payment, Subjects, envelope, eventually, inbox_ids, order_lots
from ledger_support import books_disagreements
from tally.common.v1.money_pb2 import Money
from tally.payment_gateway.v1 import events_pb2 as payment_events
from tally_kit.db import MerchantDirectory

pytestmark = pytest.mark.integration


async def new_merchant(subjects: Subjects, credits: str = "100") -> tuple[str, str]:
    """A merchant the catalog knows (the ledger not yet) and one of its sellable products."""
    merchant_id = f"pay-{secrets.token_hex(3)}"
    await subjects.catalog.create_merchant(merchant_id)
    product = await subjects.catalog.create_product(merchant_id, credits=credits)
    return merchant_id, product.product_id


async def settled_lot(directory: MerchantDirectory, payment: Payment) -> dict[str, object]:
    (lot,) = await eventually(
        lambda: order_lots(directory, payment.merchant_id, payment.order_id), lambda lots: len(lots) == 1
    )
    return dict(lot)


async def test_a_capture_settles_one_lot_for_a_merchant_seen_first(subjects: Subjects) -> None:
    merchant_id, product_id = await new_merchant(subjects, credits="250")
    assert not await subjects.directory.is_provisioned(merchant_id)
    payment = Payment.new(merchant_id, product_id)

    await subjects.gateway.publish(payment.captured())

    lot = await settled_lot(subjects.directory, payment)
    assert (lot["credits"], lot["remaining"], lot["reversal"]) == (Decimal(250), Decimal(250), None)
    async with subjects.directory.connection(merchant_id) as conn:
        account = await conn.fetchrow("SELECT balance FROM accounts WHERE user_id = $1", payment.user_id)
        published = await conn.fetch("SELECT event_type FROM outbox ORDER BY id")
    assert account["balance"] == Decimal(250)
    assert [row["event_type"] for row in published] == ["ledger.purchase_settled", "ledger.lot_issued"]
    await eventually(lambda: _notified(subjects, merchant_id), bool)
    assert await books_disagreements(subjects.directory, merchant_id) == []


async def _notified(subjects: Subjects, merchant_id: str) -> bool:
    return merchant_id in subjects.relay.notified


async def test_the_same_capture_twice_issues_one_lot(subjects: Subjects) -> None:
    merchant_id, product_id = await new_merchant(subjects)
    payment = Payment.new(merchant_id, product_id)
    captured = payment.captured()
    # The gateway's relay may publish an event twice (at least once), and a retried capture
    # may even be told in a new event.
    retold = payment.captured()

    for event in (captured, captured, retold):
        await subjects.gateway.publish(event)

    await eventually(
        lambda: inbox_ids(subjects.directory, merchant_id),
        lambda ids: ids == {captured.event_id, retold.event_id},
    )
    lots = await order_lots(subjects.directory, merchant_id, payment.order_id)
    assert len(lots) == 1
    async with subjects.directory.connection(merchant_id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM entries") == 1
    assert await subjects.gateway.take_parked() == []


async def test_a_refund_revokes_the_lot_and_a_chargeback_its_full_value(subjects: Subjects) -> None:
    merchant_id, product_id = await new_merchant(subjects)
    refunded, charged_back = Payment.new(merchant_id, product_id), Payment.new(merchant_id, product_id)
    for payment in (refunded, charged_back):
        await subjects.gateway.publish(payment.captured())
        await settled_lot(subjects.directory, payment)

    refund = refunded.refunded(amount_minor=500)
    await subjects.gateway.publish(refund)
    await subjects.gateway.publish(refund)
    await subjects.gateway.publish(charged_back.charged_back())

    lot = await eventually(
        lambda: settled_lot(subjects.directory, refunded), lambda lot: lot["reversal"] == "refunded"
    )
    assert lot["remaining"] == 0
    lot = await eventually(
        lambda: settled_lot(subjects.directory, charged_back), lambda lot: lot["reversal"] == "charged_back"
    )
    assert lot["remaining"] == 0
    async with subjects.directory.connection(merchant_id) as conn:
        balances = dict(await conn.fetch("SELECT user_id, balance FROM accounts"))
        revocations = await conn.fetchval("SELECT count(*) FROM entries WHERE kind = 'refund_revocation'")
    assert balances == {refunded.user_id: 0, charged_back.user_id: 0}
    assert revocations == 1, "the refund told twice is applied once"
    assert await books_disagreements(subjects.directory, merchant_id) == []


async def test_a_refund_told_before_its_capture_is_applied_once_the_capture_is(subjects: Subjects) -> None:
    merchant_id, product_id = await new_merchant(subjects)
    payment = Payment.new(merchant_id, product_id)
    # The merchant's database exists: the early refund finds no order, not no merchant.
    await subjects.gateway.publish(Payment.new(merchant_id, product_id).captured())
    await eventually(lambda: subjects.directory.is_provisioned(merchant_id), bool)

    await subjects.gateway.publish(payment.refunded(amount_minor=990))
    await subjects.gateway.publish(payment.captured())

    lot = await eventually(
        lambda: order_lots(subjects.directory, merchant_id, payment.order_id),
        lambda lots: len(lots) == 1 and lots[0]["reversal"] == "refunded",
    )
    assert lot[0]["remaining"] == 0
    assert await subjects.gateway.take_parked() == []


async def test_poison_events_are_parked_while_the_next_ones_are_handled(subjects: Subjects) -> None:
    merchant_id, product_id = await new_merchant(subjects)
    await subjects.gateway.publish(Payment.new(merchant_id, product_id).captured())
    await eventually(lambda: subjects.directory.is_provisioned(merchant_id), bool)

    malformed = Payment.new(merchant_id, "not-a-product-id").captured()
    unknown_product = Payment.new(merchant_id, str(uuid.uuid4())).captured()
    ghost_merchant = f"ghost-{secrets.token_hex(3)}"
    unknown_merchant = Payment.new(ghost_merchant, product_id).captured()
    # The envelope says one merchant, the payment another.
    misaddressed = envelope(
        "payment.captured",
        merchant_id,
        payment_events.PaymentCaptured(
            merchant_id=f"other-{secrets.token_hex(3)}",
            user_id="user-1",
            order_id="order-1",
            product_id=product_id,
            payment_id="pay-1",
            amount=Money(amount_minor=990, currency="EUR"),
            provider_reference="psp-1",
        ),
    )
    # A payload that is not the payment event its routing key names.
    mislabelled = envelope("payment.refunded", merchant_id, Payment.new(merchant_id, product_id).capture())
    poison = [malformed, unknown_product, unknown_merchant, misaddressed, mislabelled]
    good = Payment.new(merchant_id, product_id)

    for event in poison:
        await subjects.gateway.publish(event)
    await subjects.gateway.publish(good.captured())

    await settled_lot(subjects.directory, good)
    parked: list[str] = []
    await eventually(lambda: _take_parked_into(subjects, parked), lambda ids: len(ids) >= len(poison))
    assert sorted(parked) == sorted(event.event_id for event in poison)
    assert not await subjects.directory.is_provisioned(ghost_merchant), "no database for an unknown merchant"
    assert await books_disagreements(subjects.directory, merchant_id) == []


async def _take_parked_into(subjects: Subjects, parked: list[str]) -> list[str]:
    parked.extend(await subjects.gateway.take_parked())
    return parked
