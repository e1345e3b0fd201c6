"""Idempotency and concurrency over gRPC: one request id makes at most one call to the provider,
however many times and however concurrently it is sent; a key reused for another request is
refused; an order is paid by one payment at a time."""

from __future__ import annotations

import asyncio

import grpc
from tally.payment_gateway.v1 import payment_gateway_service_pb2 as api
from tally.payment_gateway.v1 import resources_pb2 as res
from tally_payment_gateway.testing import Gateway, new_id, refusal_of

from .conftest import MAIN


async def test_twenty_concurrent_purchases_with_one_request_id_charge_once(gateway: Gateway) -> None:
    # Slow answers keep the first call in flight while the repeats arrive.
    request = gateway.purchase_request(MAIN, outcome="slow")
    responses = await asyncio.gather(*(gateway.call("Purchase", request) for _ in range(20)))
    payment_ids = {response.payment.payment_id for response in responses}
    assert len(payment_ids) == 1
    # Each repeat is answered with the payment as it stood: in flight, or captured.
    assert {response.payment.state for response in responses} <= {
        res.PAYMENT_STATE_PENDING,
        res.PAYMENT_STATE_CAPTURED,
    }
    [payment_id] = payment_ids
    payment = await gateway.payment(MAIN, payment_id)
    assert payment.state == res.PAYMENT_STATE_CAPTURED
    assert len(await gateway.simulator.transactions(payment.provider_order_reference)) == 1
    await gateway.event(payment_id, "payment.captured")
    rows = await gateway.databases.fetch(
        MAIN, "SELECT count(*) AS n FROM payments WHERE order_id = $1", request.order_id
    )
    assert rows[0]["n"] == 1


async def test_a_repeat_gets_the_first_response(gateway: Gateway) -> None:
    request = gateway.purchase_request(MAIN, outcome="decline")
    first = await gateway.call("Purchase", request)
    again = await gateway.call("Purchase", request)
    assert again == first
    assert len(await gateway.simulator.transactions(first.payment.provider_order_reference)) == 1


async def test_a_request_id_reused_for_another_request_is_refused(gateway: Gateway) -> None:
    request = gateway.purchase_request(MAIN)
    await gateway.call("Purchase", request)
    other = api.PurchaseRequest()
    other.CopyFrom(request)
    other.amount.amount_minor += 1
    refusal = await gateway.refuse("Purchase", other)
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")


async def test_concurrent_captures_of_one_authorization_capture_it_once(gateway: Gateway) -> None:
    authorized = await gateway.authorize(MAIN, amount_minor=1000)
    requests = [
        api.CaptureRequest(merchant_id=MAIN, request_id=new_id(), payment_id=authorized.payment_id)
        for _ in range(5)
    ]
    outcomes = await asyncio.gather(*(gateway.call("Capture", r) for r in requests), return_exceptions=True)
    succeeded = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    refused = [outcome for outcome in outcomes if isinstance(outcome, grpc.aio.AioRpcError)]
    assert len(succeeded) == 1 and len(refused) == 4
    assert {error.code() for error in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert (await gateway.payment(MAIN, authorized.payment_id)).captured_amount.amount_minor == 1000
    await gateway.event(authorized.payment_id, "payment.captured")


async def test_an_order_is_paid_by_one_payment_at_a_time(gateway: Gateway) -> None:
    declined = await gateway.purchase(MAIN, outcome="decline")
    # A failed payment leaves its order free.
    paid = await gateway.purchase(MAIN, order_id=declined.order_id)
    assert paid.state == res.PAYMENT_STATE_CAPTURED
    refusal = await gateway.refuse("Purchase", gateway.purchase_request(MAIN, order_id=declined.order_id))
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ORDER_ALREADY_PAID")
    listed = await gateway.call(
        "ListPayments", api.ListPaymentsRequest(merchant_id=MAIN, order_id=declined.order_id)
    )
    assert [payment.payment_id for payment in listed.payments] == [paid.payment_id, declined.payment_id]


async def test_concurrent_purchases_of_one_order_take_one_payment(gateway: Gateway) -> None:
    order_id = f"order-{new_id()}"
    outcomes = await asyncio.gather(
        *(gateway.purchase(MAIN, order_id=order_id) for _ in range(5)), return_exceptions=True
    )
    paid = [outcome for outcome in outcomes if isinstance(outcome, res.Payment)]
    assert len(paid) == 1 and paid[0].state == res.PAYMENT_STATE_CAPTURED
    refusals = [refusal_of(outcome) for outcome in outcomes if isinstance(outcome, grpc.aio.AioRpcError)]
    assert [(refusal.code, refusal.reason) for refusal in refusals] == [
        (grpc.StatusCode.FAILED_PRECONDITION, "ORDER_ALREADY_PAID")
    ] * 4, outcomes
