"""Capture, Void and Refund over gRPC against the real app and the simulator: full and partial
amounts, the steps a payment's state refuses, the provider refusing a step (nothing changes,
the request may be tried again), steps whose answer is lost, and an audit row for every state
change."""

from __future__ import annotations

from datetime import timedelta

from tally.common.v1.money_pb2 import Money
from tally.payment_gateway.v1 import payment_gateway_service_pb2 as api
from tally.payment_gateway.v1 import resources_pb2 as res
from tally_payment_gateway import reconciliation
from tally_payment_gateway.testing import Gateway, new_id, usd

from .conftest import MAIN, QUIET


def capture(merchant_id: str, payment_id: str, amount_minor: int | None = None) -> api.CaptureRequest:
    request = api.CaptureRequest(merchant_id=merchant_id, request_id=new_id(), payment_id=payment_id)
    if amount_minor is not None:
        request.amount.CopyFrom(usd(amount_minor))
    return request


def void(merchant_id: str, payment_id: str) -> api.VoidRequest:
    return api.VoidRequest(merchant_id=merchant_id, request_id=new_id(), payment_id=payment_id)


def refund(
    merchant_id: str, payment_id: str, amount_minor: int | None = None, reason: str = "customer asked"
) -> api.RefundRequest:
    request = api.RefundRequest(
        merchant_id=merchant_id, request_id=new_id(), payment_id=payment_id, reason=reason
    )
    if amount_minor is not None:
        request.amount.CopyFrom(usd(amount_minor))
    return request


async def test_an_authorization_captured_in_full(gateway: Gateway) -> None:
    authorized = await gateway.authorize(MAIN, amount_minor=2000)
    assert authorized.state == res.PAYMENT_STATE_AUTHORIZED
    assert authorized.intent == res.PAYMENT_INTENT_AUTHORIZE
    assert await gateway.events_of(authorized.payment_id) == []
    captured = (await gateway.call("Capture", capture(MAIN, authorized.payment_id))).payment
    assert captured.state == res.PAYMENT_STATE_CAPTURED
    assert captured.captured_amount.amount_minor == 2000
    assert captured.provider_reference == authorized.provider_reference
    event = await gateway.event(authorized.payment_id, "payment.captured")
    assert event.payload.amount.amount_minor == 2000
    assert await gateway.audit(MAIN, authorized.payment_id) == [
        (None, "pending"),
        ("pending", "authorized"),
        ("authorized", "authorized"),
        ("authorized", "captured"),
    ]


async def test_an_authorization_captured_in_part_releases_the_rest(gateway: Gateway) -> None:
    authorized = await gateway.authorize(MAIN, amount_minor=2000)
    captured = (await gateway.call("Capture", capture(MAIN, authorized.payment_id, 1500))).payment
    assert (captured.state, captured.amount.amount_minor, captured.captured_amount.amount_minor) == (
        res.PAYMENT_STATE_CAPTURED,
        2000,
        1500,
    )
    assert (
        await gateway.event(authorized.payment_id, "payment.captured")
    ).payload.amount.amount_minor == 1500
    [charge] = await gateway.simulator.transactions(authorized.provider_order_reference)
    assert charge["settleAmount"] == 15.00
    # The provider's webhooks for the authorization and the capture: each either settled its
    # call before the call's answer arrived, or echoed what the answer recorded; never both.
    notices = await gateway.processed_notifications(MAIN, authorized.provider_reference, 2)
    assert [event_type for event_type, _ in notices] == [
        "net.authorize.payment.authorization.created",
        "net.authorize.payment.priorAuthCapture.created",
    ]
    assert {outcome for _, outcome in notices} <= {"applied", "unchanged"}
    assert await gateway.payment(MAIN, authorized.payment_id) == captured
    assert len(await gateway.audit(MAIN, authorized.payment_id)) == 4


async def test_an_authorization_voided(gateway: Gateway) -> None:
    authorized = await gateway.authorize(MAIN)
    voided = (await gateway.call("Void", void(MAIN, authorized.payment_id))).payment
    assert voided.state == res.PAYMENT_STATE_VOIDED
    assert (await gateway.event(authorized.payment_id, "payment.voided")).payload.amount.amount_minor == 1234
    [charge] = await gateway.simulator.transactions(authorized.provider_order_reference)
    assert charge["transactionStatus"] == "voided"
    assert (await gateway.audit(MAIN, authorized.payment_id))[-1] == ("authorized", "voided")


async def test_a_capture_refunded_in_parts_then_in_full(gateway: Gateway) -> None:
    payment = await gateway.purchase(MAIN, amount_minor=1000)
    await gateway.simulator.settle()
    first = await gateway.call("Refund", refund(MAIN, payment.payment_id, 300))
    assert first.payment.state == res.PAYMENT_STATE_PARTIALLY_REFUNDED
    assert first.payment.refunded_amount.amount_minor == 300
    assert (first.refund.amount.amount_minor, first.refund.origin, first.refund.reason) == (
        300,
        res.CHANGE_ORIGIN_TALLY,
        "customer asked",
    )
    rest = await gateway.call("Refund", refund(MAIN, payment.payment_id))
    assert rest.payment.state == res.PAYMENT_STATE_REFUNDED
    assert rest.refund.amount.amount_minor == 700
    assert [r.refund_id for r in rest.payment.refunds] == [first.refund.refund_id, rest.refund.refund_id]
    events = await gateway.published(payment.payment_id, "payment.refunded", 2)
    assert [
        (
            event.payload.refund_id,
            event.payload.refunded_amount.amount_minor,
            event.payload.total_refunded.amount_minor,
        )
        for event in events
    ] == [(first.refund.refund_id, 300, 300), (rest.refund.refund_id, 700, 1000)]
    # Each refund's own webhook arrives too: it echoes what is recorded and changes nothing.
    for recorded in rest.payment.refunds:
        assert await gateway.processed_notifications(MAIN, recorded.provider_reference, 1) == [
            ("net.authorize.payment.refund.created", "unchanged")
        ]
    assert await gateway.payment(MAIN, payment.payment_id) == rest.payment
    assert (await gateway.audit(MAIN, payment.payment_id))[-4:] == [
        ("captured", "captured"),
        ("captured", "partially_refunded"),
        ("partially_refunded", "partially_refunded"),
        ("partially_refunded", "refunded"),
    ]


async def test_a_refund_over_what_was_captured_is_refused_with_its_reason(gateway: Gateway) -> None:
    payment = await gateway.purchase(MAIN, amount_minor=1000)
    await gateway.simulator.settle()
    await gateway.call("Refund", refund(MAIN, payment.payment_id, 600))
    refusal = await gateway.refuse("Refund", refund(MAIN, payment.payment_id, 401))
    assert (refusal.code.name, refusal.reason, refusal.domain) == (
        "FAILED_PRECONDITION",
        "AMOUNT_EXCEEDS_REFUNDABLE",
        "payment_gateway.tally",
    )
    after = await gateway.payment(MAIN, payment.payment_id)
    assert (after.state, after.refunded_amount.amount_minor) == (res.PAYMENT_STATE_PARTIALLY_REFUNDED, 600)


async def test_steps_the_payments_state_does_not_allow_are_refused(gateway: Gateway) -> None:
    captured = await gateway.purchase(MAIN)
    authorized = await gateway.authorize(MAIN, amount_minor=500)
    failed = await gateway.purchase(MAIN, outcome="decline")
    cases = [
        ("Capture", capture(MAIN, captured.payment_id), "PAYMENT_NOT_CAPTURABLE"),
        ("Void", void(MAIN, captured.payment_id), "PAYMENT_NOT_VOIDABLE"),
        ("Refund", refund(MAIN, authorized.payment_id), "PAYMENT_NOT_REFUNDABLE"),
        ("Capture", capture(MAIN, authorized.payment_id, 501), "AMOUNT_EXCEEDS_AUTHORIZED"),
        ("Capture", capture(MAIN, failed.payment_id), "PAYMENT_NOT_CAPTURABLE"),
        ("Refund", refund(MAIN, failed.payment_id), "PAYMENT_NOT_REFUNDABLE"),
    ]
    for rpc, request, reason in cases:
        refusal = await gateway.refuse(rpc, request)
        assert (rpc, refusal.code.name, refusal.reason) == (rpc, "FAILED_PRECONDITION", reason)
    for payment in (captured, authorized, failed):
        assert await gateway.payment(MAIN, payment.payment_id) == payment
    # The refused requests left their keys free: the same request, once allowed, goes through.
    voided = await gateway.call("Void", void(MAIN, authorized.payment_id))
    assert voided.payment.state == res.PAYMENT_STATE_VOIDED
    assert (await gateway.refuse("Capture", capture(MAIN, authorized.payment_id))).reason == (
        "PAYMENT_NOT_CAPTURABLE"
    )


async def test_an_amount_in_another_currency_or_an_unknown_payment_is_refused(gateway: Gateway) -> None:
    authorized = await gateway.authorize(MAIN)
    in_euros = capture(MAIN, authorized.payment_id)
    in_euros.amount.CopyFrom(Money(amount_minor=100, currency="EUR"))
    refusal = await gateway.refuse("Capture", in_euros)
    assert (refusal.code.name, refusal.fields) == ("INVALID_ARGUMENT", ("amount.currency",))
    missing = await gateway.refuse("Capture", capture(MAIN, "0b6f3c1e-8f0a-4c5e-9a51-2f4f1c9e7d10"))
    assert (missing.code.name, missing.reason) == ("NOT_FOUND", "PAYMENT_NOT_FOUND")


async def test_a_step_the_provider_refuses_changes_nothing_and_may_be_tried_again(gateway: Gateway) -> None:
    payment = await gateway.purchase(MAIN, amount_minor=800)
    # Not settled yet: Authorize.Net refuses to refund a capture before its batch settles.
    request = refund(MAIN, payment.payment_id, 800)
    refusal = await gateway.refuse("Refund", request)
    assert (refusal.code.name, refusal.reason) == ("FAILED_PRECONDITION", "PROVIDER_ERROR")
    unchanged = await gateway.payment(MAIN, payment.payment_id)
    assert unchanged.state == res.PAYMENT_STATE_CAPTURED
    assert unchanged.failure_code == "PROVIDER_ERROR"
    assert unchanged.pending_operation == res.PAYMENT_OPERATION_UNSPECIFIED
    await gateway.simulator.settle()
    retried = await gateway.call("Refund", request)
    assert retried.payment.state == res.PAYMENT_STATE_REFUNDED
    assert retried.payment.failure_code == ""
    await gateway.event(payment.payment_id, "payment.refunded")


async def test_a_capture_whose_answer_is_lost_is_settled_by_asking(gateway: Gateway) -> None:
    authorized = await gateway.authorize(QUIET, amount_minor=900)
    await gateway.simulator.script("lost", transactionType="priorAuthCaptureTransaction")
    unknown = (await gateway.call("Capture", capture(QUIET, authorized.payment_id, 700))).payment
    assert (unknown.state, unknown.pending_operation) == (
        res.PAYMENT_STATE_UNKNOWN,
        res.PAYMENT_OPERATION_CAPTURE,
    )
    await gateway.reconcile()
    captured = await gateway.payment(QUIET, authorized.payment_id)
    assert (captured.state, captured.captured_amount.amount_minor) == (res.PAYMENT_STATE_CAPTURED, 700)
    assert (await gateway.event(authorized.payment_id, "payment.captured")).payload.amount.amount_minor == 700


async def test_a_refund_that_never_reached_the_provider_leaves_the_payment_as_it_was(
    gateway: Gateway,
) -> None:
    payment = await gateway.purchase(QUIET, amount_minor=600)
    await gateway.simulator.settle()
    await gateway.simulator.script(
        "timeout", transactionType="refundTransaction", invoiceNumber=payment.provider_order_reference
    )
    response = await gateway.call("Refund", refund(QUIET, payment.payment_id, 200))
    assert response.payment.state == res.PAYMENT_STATE_UNKNOWN
    assert not response.HasField("refund")
    await gateway.reconcile(later=reconciliation.settle_after(gateway.settings) + timedelta(seconds=1))
    after = await gateway.payment(QUIET, payment.payment_id)
    assert (after.state, after.failure_code, after.refunded_amount.amount_minor) == (
        res.PAYMENT_STATE_CAPTURED,
        "NOT_FOUND_AT_PROVIDER",
        0,
    )
    assert await gateway.events_of(payment.payment_id, routing_key="payment.refunded") == []
    # Back where it was, the payment takes the refund again.
    again = await gateway.call("Refund", refund(QUIET, payment.payment_id, 200))
    assert again.payment.state == res.PAYMENT_STATE_PARTIALLY_REFUNDED


async def test_a_refund_whose_answer_is_lost_is_found_at_the_provider(gateway: Gateway) -> None:
    payment = await gateway.purchase(QUIET, amount_minor=600)
    await gateway.simulator.settle()
    await gateway.simulator.script(
        "lost", transactionType="refundTransaction", invoiceNumber=payment.provider_order_reference
    )
    request = refund(QUIET, payment.payment_id, 250)
    response = await gateway.call("Refund", request)
    assert response.payment.state == res.PAYMENT_STATE_UNKNOWN
    await gateway.reconcile()
    refunded = await gateway.payment(QUIET, payment.payment_id)
    assert (refunded.state, refunded.refunded_amount.amount_minor) == (
        res.PAYMENT_STATE_PARTIALLY_REFUNDED,
        250,
    )
    event = await gateway.event(payment.payment_id, "payment.refunded")
    assert event.payload.refund_id == refunded.refunds[0].refund_id
    # The repeat of the request answers with the refund the job recorded.
    repeat = await gateway.call("Refund", request)
    assert repeat.refund.refund_id == refunded.refunds[0].refund_id
    assert repeat.payment.state == res.PAYMENT_STATE_PARTIALLY_REFUNDED
