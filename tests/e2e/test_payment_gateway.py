"""A purchase paid through Tally's payment gateway, against the PSP simulator process, followed
through the stack: the gateway's `payment.captured` and `payment.refunded` events settle and
refund the order in the ledger, whose events issue the receipt and its credit note."""

from __future__ import annotations

import secrets

import pytest
from e2e_suite import Merchant, Stack, new_id, one_time_token
from tally.common.v1.money_pb2 import Money
from tally.ledger.v1 import resources_pb2 as ledger_res
from tally.payment_gateway.v1 import payment_gateway_service_pb2 as payments_api
from tally.payment_gateway.v1 import resources_pb2 as payments_res

pytestmark = pytest.mark.integration

# 20 % tax included: 14.90 EUR is 12.42 EUR net and 2.48 EUR tax.
PAID = Money(amount_minor=1490, currency="EUR")


@pytest.fixture(scope="module")
async def merchant(stack: Stack) -> Merchant:
    return await stack.create_merchant("gateway")


async def test_a_purchase_and_its_refund_through_the_payment_gateway(
    stack: Stack, merchant: Merchant
) -> None:
    merchant_id = merchant.merchant_id
    user_id, order_id = f"user-{secrets.token_hex(4)}", f"order-{new_id()}"
    app = {"role": "app", "merchant_id": merchant_id}

    purchased = await stack.payment_gateway.call(
        "Purchase",
        payments_api.PurchaseRequest(
            merchant_id=merchant_id,
            request_id=new_id(),
            user_id=user_id,
            order_id=order_id,
            product_id=merchant.product.product_id,
            amount=PAID,
            payment_source=one_time_token("approve"),
            description="Starter pack",
        ),
        **app,
    )
    payment = purchased.payment
    assert (payment.state, payment.captured_amount) == (payments_res.PAYMENT_STATE_CAPTURED, PAID)

    # The capture settled the order in the ledger, and the ledger's event issued the receipt.
    found = await stack.only_receipt(merchant_id, user_id)
    [lot] = await stack.lots(merchant_id, user_id)
    assert (lot.source, lot.order_id, lot.product_id, lot.credits.value, lot.state) == (
        ledger_res.LOT_SOURCE_PURCHASE,
        order_id,
        merchant.product.product_id,
        "100",
        ledger_res.LOT_STATE_ACTIVE,
    )
    assert (await stack.balance(merchant_id, user_id)).balance.value == "100"
    receipt = found.receipt
    assert (receipt.order_id, receipt.lot_id, receipt.payment_id, receipt.provider_reference) == (
        order_id,
        lot.lot_id,
        payment.payment_id,
        payment.provider_reference,
    )
    assert (receipt.totals.net.amount_minor, receipt.totals.tax.amount_minor, receipt.totals.gross) == (
        1242,
        248,
        PAID,
    )
    assert receipt.merchant.legal_name == merchant.config.legal_name
    assert list(found.credit_notes) == []

    # Authorize.Net refunds a capture once its batch has settled.
    await stack.simulator.settle()
    refunded = await stack.payment_gateway.call(
        "Refund",
        payments_api.RefundRequest(
            merchant_id=merchant_id,
            request_id=new_id(),
            payment_id=payment.payment_id,
            amount=PAID,
            reason="changed their mind",
        ),
        **app,
    )
    assert refunded.payment.state == payments_res.PAYMENT_STATE_REFUNDED

    found = await stack.only_receipt(merchant_id, user_id)
    [lot] = await stack.lots(merchant_id, user_id)
    assert (lot.state, lot.remaining.value) == (ledger_res.LOT_STATE_REFUNDED, "0")
    balance = await stack.balance(merchant_id, user_id)
    assert balance.balance.value == "0" and list(balance.lots) == []
    [note] = found.credit_notes
    assert (note.receipt_id, note.receipt_number, note.order_id) == (
        receipt.receipt_id,
        receipt.number,
        order_id,
    )
    assert (note.refund_reference, note.amounts) == (refunded.refund.refund_id, receipt.totals)
