"""Every outcome the simulator can give a Purchase, over gRPC against the real app: the payment's
state, the event published, the audit trail, and, for the outcomes left unknown, how the
reconciliation job settles them by asking the provider, never by charging again."""

from __future__ import annotations

import time
from datetime import timedelta

from tally.payment_gateway.v1 import payment_gateway_service_pb2 as api
from tally.payment_gateway.v1 import resources_pb2 as res
from tally_payment_gateway import reconciliation
from tally_payment_gateway.testing import SLOW_SECONDS, Gateway, new_id

from .conftest import MAIN, QUIET


def overdue(gateway: Gateway) -> timedelta:
    """How far the job's clock must move for a call started now to be overdue."""
    return reconciliation.settle_after(gateway.settings) + timedelta(seconds=1)


async def test_an_approved_purchase_is_captured_and_announced(gateway: Gateway) -> None:
    correlation_id = new_id()
    payment = await gateway.purchase(MAIN, amount_minor=1234, correlation_id=correlation_id)
    assert payment.state == res.PAYMENT_STATE_CAPTURED
    assert payment.captured_amount.amount_minor == 1234
    assert payment.pending_operation == res.PAYMENT_OPERATION_UNSPECIFIED
    assert payment.provider == "authorize_net" and payment.provider_reference
    assert (payment.account_suffix, payment.account_type) == ("XXXX1111", "Visa")
    captured = await gateway.event(payment.payment_id, "payment.captured")
    assert captured.envelope.correlation_id == correlation_id
    assert (captured.payload.order_id, captured.payload.product_id, captured.payload.user_id) == (
        payment.order_id,
        payment.product_id,
        payment.user_id,
    )
    assert (captured.payload.amount.amount_minor, captured.payload.amount.currency) == (1234, "USD")
    assert captured.payload.provider_reference == payment.provider_reference
    [charge] = await gateway.simulator.transactions(payment.provider_order_reference)
    assert charge["transId"] == payment.provider_reference
    assert await gateway.audit(MAIN, payment.payment_id) == [(None, "pending"), ("pending", "captured")]


async def test_a_declined_purchase_fails_and_is_announced(gateway: Gateway) -> None:
    payment = await gateway.purchase(MAIN, outcome="decline")
    assert payment.state == res.PAYMENT_STATE_FAILED
    assert payment.failure_code == "DECLINED"
    assert "declined" in payment.failure_message
    failed = await gateway.event(payment.payment_id, "payment.failed")
    assert failed.payload.failure_code == "DECLINED"
    assert await gateway.audit(MAIN, payment.payment_id) == [(None, "pending"), ("pending", "failed")]


async def test_a_purchase_the_provider_refuses_fails_with_its_error(gateway: Gateway) -> None:
    payment = await gateway.purchase(MAIN, outcome="error")
    assert payment.state == res.PAYMENT_STATE_FAILED
    assert payment.failure_code == "PROVIDER_ERROR"
    assert payment.provider_reference == ""
    assert (
        await gateway.event(payment.payment_id, "payment.failed")
    ).payload.failure_code == "PROVIDER_ERROR"
    assert await gateway.simulator.transactions(payment.provider_order_reference) == []


async def test_a_purchase_held_for_review_is_captured_when_the_review_approves_it(gateway: Gateway) -> None:
    payment = await gateway.purchase(MAIN, outcome="review")
    assert payment.state == res.PAYMENT_STATE_PENDING
    assert payment.held_for_review and payment.provider_reference
    assert payment.pending_operation == res.PAYMENT_OPERATION_UNSPECIFIED
    assert await gateway.events_of(payment.payment_id) == []
    # The merchant approves it in the provider's dashboard; the provider's webhook tells Tally.
    await gateway.simulator.control(
        "POST", f"/transactions/{payment.provider_reference}/review", {"decision": "approve"}
    )
    captured = await gateway.payment_in(MAIN, payment.payment_id, res.PAYMENT_STATE_CAPTURED)
    assert not captured.held_for_review and captured.captured_amount.amount_minor == 1234
    assert (await gateway.event(payment.payment_id, "payment.captured")).payload.amount.amount_minor == 1234
    assert await gateway.audit(MAIN, payment.payment_id) == [
        (None, "pending"),
        ("pending", "pending"),
        ("pending", "captured"),
    ]


async def test_a_purchase_declined_after_review_fails(gateway: Gateway) -> None:
    payment = await gateway.purchase(MAIN, outcome="review")
    await gateway.simulator.control(
        "POST", f"/transactions/{payment.provider_reference}/review", {"decision": "decline"}
    )
    failed = await gateway.payment_in(MAIN, payment.payment_id, res.PAYMENT_STATE_FAILED)
    assert failed.failure_code == "REVIEW_DECLINED"
    assert (
        await gateway.event(payment.payment_id, "payment.failed")
    ).payload.failure_code == "REVIEW_DECLINED"


async def test_a_slow_answer_within_the_timeout_is_an_answer(gateway: Gateway) -> None:
    started = time.perf_counter()
    payment = await gateway.purchase(MAIN, outcome="slow")
    assert time.perf_counter() - started >= SLOW_SECONDS
    assert payment.state == res.PAYMENT_STATE_CAPTURED
    await gateway.event(payment.payment_id, "payment.captured")


async def test_a_timeout_leaves_the_payment_unknown_until_the_provider_is_asked(gateway: Gateway) -> None:
    payment = await gateway.purchase(QUIET, outcome="timeout")
    assert payment.state == res.PAYMENT_STATE_UNKNOWN
    assert payment.pending_operation == res.PAYMENT_OPERATION_PURCHASE
    # Every other change waits for the outcome.
    refusal = await gateway.refuse(
        "Refund", api.RefundRequest(merchant_id=QUIET, request_id=new_id(), payment_id=payment.payment_id)
    )
    assert refusal.reason == "PAYMENT_OUTCOME_UNKNOWN"
    # Right after the call the provider may still be at work: nothing found proves nothing yet.
    await gateway.reconcile()
    assert (await gateway.payment(QUIET, payment.payment_id)).state == res.PAYMENT_STATE_UNKNOWN
    # Once the call is overdue, the charge the provider never recorded did not happen.
    await gateway.reconcile(later=overdue(gateway))
    failed = await gateway.payment(QUIET, payment.payment_id)
    assert failed.state == res.PAYMENT_STATE_FAILED
    assert failed.failure_code == "NOT_FOUND_AT_PROVIDER"
    assert failed.pending_operation == res.PAYMENT_OPERATION_UNSPECIFIED
    assert (await gateway.event(payment.payment_id, "payment.failed")).payload.failure_code == (
        "NOT_FOUND_AT_PROVIDER"
    )
    assert await gateway.simulator.transactions(payment.provider_order_reference) == []
    assert await gateway.audit(QUIET, payment.payment_id) == [
        (None, "pending"),
        ("pending", "unknown"),
        ("unknown", "failed"),
    ]


async def test_a_server_error_leaves_the_payment_unknown_until_the_provider_is_asked(
    gateway: Gateway,
) -> None:
    payment = await gateway.purchase(QUIET, outcome="server-error")
    assert payment.state == res.PAYMENT_STATE_UNKNOWN
    await gateway.reconcile(later=overdue(gateway))
    assert (await gateway.payment(QUIET, payment.payment_id)).state == res.PAYMENT_STATE_FAILED
    await gateway.event(payment.payment_id, "payment.failed")


async def test_an_approval_whose_answer_is_lost_is_captured_once_by_asking(gateway: Gateway) -> None:
    request = gateway.purchase_request(QUIET, outcome="lost")
    payment = (await gateway.call("Purchase", request)).payment
    assert payment.state == res.PAYMENT_STATE_UNKNOWN
    [charge] = await gateway.simulator.transactions(payment.provider_order_reference)
    assert charge["transactionStatus"] == "capturedPendingSettlement"
    # A repeat of the request is answered from what Tally knows; it charges nothing.
    repeat = (await gateway.call("Purchase", request)).payment
    assert (repeat.payment_id, repeat.state) == (payment.payment_id, res.PAYMENT_STATE_UNKNOWN)
    # The charge is found at the provider: no need to wait for the call to be overdue.
    await gateway.reconcile()
    captured = await gateway.payment(QUIET, payment.payment_id)
    assert captured.state == res.PAYMENT_STATE_CAPTURED
    assert captured.provider_reference == charge["transId"]
    assert (await gateway.event(payment.payment_id, "payment.captured")).payload.provider_reference == (
        charge["transId"]
    )
    # Exactly one charge, however often the request is repeated and the job runs.
    assert (await gateway.call("Purchase", request)).payment.state == res.PAYMENT_STATE_CAPTURED
    await gateway.reconcile(later=overdue(gateway))
    assert len(await gateway.simulator.transactions(payment.provider_order_reference)) == 1
    assert len(await gateway.events_of(payment.payment_id)) == 1
