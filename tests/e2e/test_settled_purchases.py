"""A purchase settled by an upstream application's own checkout (`SettlePurchase` on the
ledger), a refund and a grant, followed through the stack: the ledger's lots, and the receipt
service's documents issued from the ledger's events over RabbitMQ, with the merchant details
the catalog holds."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from e2e_suite import Merchant, Stack, new_id, pdf_text
from tally.common.v1.money_pb2 import Credits, Money
from tally.ledger.v1 import ledger_service_pb2 as ledger_api
from tally.ledger.v1 import resources_pb2 as ledger_res
from tally.receipt.v1 import receipt_service_pb2 as receipt_api
from tally_kit.events import unpack_payload

pytestmark = pytest.mark.integration

# 20 % tax included: 9.90 EUR is 8.25 EUR net and 1.65 EUR tax, with no rounding.
PAID_MINOR, NET_MINOR, TAX_MINOR = 990, 825, 165


@pytest.fixture(scope="module")
async def merchant(stack: Stack) -> Merchant:
    return await stack.create_merchant("checkout")


def new_user() -> str:
    return f"user-{secrets.token_hex(4)}"


async def settle(
    stack: Stack, merchant: Merchant, user_id: str, order_id: str, *, amount_minor: int = PAID_MINOR
) -> ledger_api.SettlePurchaseResponse:
    """The merchant's upstream application settles an order its own checkout was paid for."""
    request = ledger_api.SettlePurchaseRequest(
        merchant_id=merchant.merchant_id,
        request_id=new_id(),
        order_id=order_id,
        user_id=user_id,
        product_id=merchant.product.product_id,
        amount_paid=Money(amount_minor=amount_minor, currency="EUR"),
        provider_reference=f"checkout-{order_id}",
    )
    return await stack.ledger.call("SettlePurchase", request, role="app", merchant_id=merchant.merchant_id)


async def test_a_settled_purchase_gets_one_lot_and_one_receipt_with_the_catalog_s_details(
    stack: Stack, merchant: Merchant
) -> None:
    user_id, order_id = new_user(), f"order-{new_id()}"
    settled = await settle(stack, merchant, user_id, order_id)

    [lot] = await stack.lots(merchant.merchant_id, user_id)
    assert (lot.lot_id, lot.source, lot.order_id, lot.credits.value, lot.state) == (
        settled.lot.lot_id,
        ledger_res.LOT_SOURCE_PURCHASE,
        order_id,
        "100",
        ledger_res.LOT_STATE_ACTIVE,
    )
    assert (await stack.balance(merchant.merchant_id, user_id)).balance.value == "100"

    found = await stack.only_receipt(merchant.merchant_id, user_id)
    receipt = found.receipt
    assert (receipt.order_id, receipt.user_id, receipt.lot_id) == (order_id, user_id, lot.lot_id)
    assert receipt.provider_reference == f"checkout-{order_id}" and receipt.payment_id == ""
    assert (receipt.totals.net, receipt.totals.tax, receipt.totals.gross) == (
        Money(amount_minor=NET_MINOR, currency="EUR"),
        Money(amount_minor=TAX_MINOR, currency="EUR"),
        Money(amount_minor=PAID_MINOR, currency="EUR"),
    )
    [line] = receipt.lines
    assert (line.description, line.product_id, line.amounts) == (
        "Starter pack",
        merchant.product.product_id,
        receipt.totals,
    )
    # The merchant's details and tax regime, as the catalog holds them.
    config = merchant.config
    assert (receipt.merchant.legal_name, receipt.merchant.tax_id) == (config.legal_name, config.tax_id)
    assert list(receipt.merchant.address.address_lines) == list(config.address.address_lines)
    assert (receipt.merchant.address.locality, receipt.merchant.address.region_code) == (
        config.address.locality,
        config.address.region_code,
    )
    assert (receipt.tax_regime.rate_percent, receipt.tax_regime.prices_include_tax) == (
        config.tax_regime.rate_percent,
        config.tax_regime.prices_include_tax,
    )
    assert receipt.series == config.receipt_series_prefix
    assert receipt.number.startswith(f"{config.receipt_series_prefix}-")
    assert list(found.credit_notes) == []

    rendered = await stack.receipt.call(
        "RenderReceiptPdf",
        receipt_api.RenderReceiptPdfRequest(merchant_id=merchant.merchant_id, receipt_id=receipt.receipt_id),
        role="app",
        merchant_id=merchant.merchant_id,
    )
    assert rendered.pdf.startswith(b"%PDF-")
    text = pdf_text(rendered.pdf)
    for expected in (receipt.number, config.legal_name, "9.90 EUR"):
        assert expected in text, f"{expected!r} is not in the PDF's text"


async def test_a_refund_revokes_the_lot_and_gets_a_credit_note_referring_to_the_receipt(
    stack: Stack, merchant: Merchant
) -> None:
    user_id, order_id = new_user(), f"order-{new_id()}"
    settled = await settle(stack, merchant, user_id, order_id)
    receipt = (await stack.only_receipt(merchant.merchant_id, user_id)).receipt

    refund = ledger_api.ApplyRefundRequest(
        merchant_id=merchant.merchant_id,
        request_id=new_id(),
        order_id=order_id,
        refund_reference=f"refund-{order_id}",
        amount_refunded=Money(amount_minor=PAID_MINOR, currency="EUR"),
        reason="changed their mind",
    )
    refunded = await stack.ledger.call("ApplyRefund", refund, role="admin", merchant_id=merchant.merchant_id)
    assert (refunded.lot.lot_id, refunded.credits_revoked.value) == (settled.lot.lot_id, "100")

    balance = await stack.balance(merchant.merchant_id, user_id)
    assert balance.balance.value == "0" and list(balance.lots) == []
    [lot] = await stack.lots(merchant.merchant_id, user_id)
    assert (lot.lot_id, lot.state, lot.remaining.value) == (
        settled.lot.lot_id,
        ledger_res.LOT_STATE_REFUNDED,
        "0",
    )

    found = await stack.only_receipt(merchant.merchant_id, user_id)
    assert found.receipt.receipt_id == receipt.receipt_id
    [note] = found.credit_notes
    assert (note.receipt_id, note.receipt_number, note.order_id, note.user_id) == (
        receipt.receipt_id,
        receipt.number,
        order_id,
        user_id,
    )
    assert note.refund_reference == f"refund-{order_id}"
    assert note.amounts == receipt.totals
    assert note.merchant.legal_name == merchant.config.legal_name
    assert (
        note.number.startswith(f"{merchant.config.receipt_series_prefix}-") and note.number != receipt.number
    )


async def test_an_order_settled_twice_has_one_lot_and_one_receipt(stack: Stack, merchant: Merchant) -> None:
    user_id, order_id = new_user(), f"order-{new_id()}"
    # Twice at once, then once more: each with a request id of its own, as a checkout
    # retrying after a lost answer would.
    first, second = await asyncio.gather(
        settle(stack, merchant, user_id, order_id), settle(stack, merchant, user_id, order_id)
    )
    third = await settle(stack, merchant, user_id, order_id)
    assert first.lot.lot_id == second.lot.lot_id == third.lot.lot_id

    [lot] = await stack.lots(merchant.merchant_id, user_id)
    assert lot.lot_id == first.lot.lot_id
    assert (await stack.balance(merchant.merchant_id, user_id)).balance.value == "100"
    # The ledger announced the purchase once: a second announcement would reach every consumer.
    announced = await stack.ledger.outbox(merchant.merchant_id, ("ledger.purchase_settled",))
    assert [unpack_payload(event).order_id for event in announced].count(order_id) == 1

    found = await stack.only_receipt(merchant.merchant_id, user_id)
    assert (found.receipt.order_id, found.receipt.lot_id) == (order_id, lot.lot_id)


async def test_a_grant_issues_a_lot_but_never_a_receipt(stack: Stack, merchant: Merchant) -> None:
    user_id = new_user()
    admin = {"role": "admin", "merchant_id": merchant.merchant_id}
    by_product = await stack.ledger.call(
        "GrantCredits",
        ledger_api.GrantCreditsRequest(
            merchant_id=merchant.merchant_id,
            request_id=new_id(),
            user_id=user_id,
            grant_key=f"welcome-{user_id}",
            product_id=merchant.grant_product.product_id,
            source=ledger_res.LOT_SOURCE_GRANT,
        ),
        **admin,
    )
    custom = await stack.ledger.call(
        "GrantCredits",
        ledger_api.GrantCreditsRequest(
            merchant_id=merchant.merchant_id,
            request_id=new_id(),
            user_id=user_id,
            grant_key=f"gift-{user_id}",
            custom=ledger_api.CustomGrant(credits=Credits(value="5")),
            source=ledger_res.LOT_SOURCE_PROMOTION,
        ),
        **admin,
    )
    # Then a purchase by the same user: every event the ledger announced for the merchant is
    # handled once its receipt is there, and that receipt must be the user's only one.
    order_id = f"order-{new_id()}"
    purchase = await settle(stack, merchant, user_id, order_id)

    lots = await stack.lots(merchant.merchant_id, user_id)
    assert sorted((lot.lot_id, lot.source) for lot in lots) == sorted(
        [
            (by_product.lot.lot_id, ledger_res.LOT_SOURCE_GRANT),
            (custom.lot.lot_id, ledger_res.LOT_SOURCE_PROMOTION),
            (purchase.lot.lot_id, ledger_res.LOT_SOURCE_PURCHASE),
        ]
    )
    assert (await stack.balance(merchant.merchant_id, user_id)).balance.value == "155"

    found = await stack.only_receipt(merchant.merchant_id, user_id)
    assert (found.receipt.order_id, found.receipt.lot_id) == (order_id, purchase.lot.lot_id)


async def test_concurrent_purchases_of_one_merchant_are_numbered_without_a_gap(stack: Stack) -> None:
    merchant = await stack.create_merchant("numbering")
    users = [new_user() for _ in range(5)]
    orders = {f"order-{index:02d}-{new_id()}": users[index % len(users)] for index in range(20)}
    await asyncio.gather(*(settle(stack, merchant, user, order) for order, user in orders.items()))

    await stack.delivered(merchant.merchant_id)
    receipts = [receipt for user in users for receipt in await stack.receipts(merchant.merchant_id, user)]
    assert sorted(receipt.order_id for receipt in receipts) == sorted(orders)
    assert sorted(receipt.sequence for receipt in receipts) == list(range(1, 21))
    assert len({receipt.number for receipt in receipts}) == 20
    assert {(receipt.series, receipt.year) for receipt in receipts} == {
        (merchant.config.receipt_series_prefix, receipts[0].year)
    }
