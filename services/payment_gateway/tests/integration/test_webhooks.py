"""Provider notifications end to end: the simulator signs and sends them, the receiver hands them
to `HandleProviderWebhook` as the HTTP gateway would, the app acknowledges them and processes
them from RabbitMQ. Signatures (missing, wrong, either case of hex digits, a body serialized
again), duplicates, notifications out of order, and changes made in the provider's dashboard
(capture, void, refund, chargeback) reaching the payments and their events."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import uuid
from datetime import UTC, datetime

import aio_pika
import grpc
from tally.common.v1.event_pb2 import EventEnvelope
from tally.payment_gateway.v1 import payment_gateway_service_pb2 as api
from tally.payment_gateway.v1 import resources_pb2 as res
from tally_kit.amounts import Money
from tally_kit.events import unpack_payload
from tally_kit.events.topology import parking_queue_name
from tally_payment_gateway.domain import contains_card_number
from tally_payment_gateway.handlers import consumer_name
from tally_payment_gateway.provider import ChargeRequest, OneTimeToken, RefundRequest
from tally_payment_gateway.testing import Gateway, Notification, eventually, webhook_request

from .conftest import HELD, HOOKS

AUTH_CAPTURE = "net.authorize.payment.authcapture.created"
AUTHORIZATION = "net.authorize.payment.authorization.created"
PRIOR_AUTH_CAPTURE = "net.authorize.payment.priorAuthCapture.created"
REFUND = "net.authorize.payment.refund.created"
VOID = "net.authorize.payment.void.created"


def signed(gateway: Gateway, merchant_id: str, document: dict, *, upper: bool = True) -> Notification:
    """A notification signed with the merchant's signature key, as Authorize.Net signs one."""
    body = json.dumps(document, separators=(",", ":")).encode()
    key = gateway.accounts[merchant_id].signature_key.get_secret_value().encode()
    digest = hmac.new(key, body, hashlib.sha512).hexdigest()
    return Notification(
        {
            "content-type": "application/json",
            "x-anet-signature": f"sha512={digest.upper() if upper else digest}",
        },
        body,
    )


def notification_about(payment: res.Payment, event_type: str = AUTH_CAPTURE) -> dict:
    return {
        "notificationId": str(uuid.uuid4()),
        "eventType": event_type,
        "eventDate": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "webhookId": str(uuid.uuid4()),
        "payload": {
            "responseCode": 1,
            "authCode": "ABC123",
            "avsResponse": "Y",
            "authAmount": payment.amount.amount_minor / 100,
            "invoiceNumber": payment.provider_order_reference,
            "entityName": "transaction",
            "id": payment.provider_reference,
        },
    }


async def deliver(gateway: Gateway, merchant_id: str, notification: Notification):
    return await gateway.call("HandleProviderWebhook", webhook_request(merchant_id, notification), role=None)


async def refused_delivery(gateway: Gateway, merchant_id: str, notification: Notification):
    return await gateway.refuse(
        "HandleProviderWebhook", webhook_request(merchant_id, notification), role=None
    )


async def test_a_notification_without_a_valid_signature_is_refused_and_changes_nothing(
    gateway: Gateway,
) -> None:
    payment = await gateway.purchase(HELD)
    genuine = signed(gateway, HELD, notification_about(payment))
    unsigned = Notification({"content-type": "application/json"}, genuine.body)
    wrong_key = hmac.new(secrets.token_bytes(32), genuine.body, hashlib.sha512).hexdigest().upper()
    forged = Notification({**genuine.headers, "x-anet-signature": f"sha512={wrong_key}"}, genuine.body)
    # The same document with other spacing: the signature covers the bytes, not the JSON.
    reserialized = Notification(genuine.headers, json.dumps(json.loads(genuine.body), indent=1).encode())
    before = await gateway.databases.snapshot(HELD)
    for notification in (unsigned, forged, reserialized):
        refusal = await refused_delivery(gateway, HELD, notification)
        assert (refusal.code, refusal.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "WEBHOOK_SIGNATURE_INVALID",
        )
    assert await gateway.databases.snapshot(HELD) == before
    # A merchant with no provider account has no key to check a signature with.
    stranger = await refused_delivery(gateway, "no-account", genuine)
    assert stranger.reason == "PROVIDER_NOT_CONFIGURED"


async def test_a_valid_signature_is_accepted_in_upper_or_lower_case_hex(gateway: Gateway) -> None:
    payment = await gateway.purchase(HELD)
    for upper in (True, False):
        document = notification_about(payment)
        response = await deliver(gateway, HELD, signed(gateway, HELD, document, upper=upper))
        assert (response.notification_id, response.duplicate) == (document["notificationId"], False)
    # Both are about a capture the payment recorded already.
    assert await gateway.processed_notifications(HELD, payment.provider_reference, 2) == [
        (AUTH_CAPTURE, "unchanged"),
        (AUTH_CAPTURE, "unchanged"),
    ]


async def test_a_signature_whose_digits_read_as_a_card_number_is_still_a_signature(gateway: Gateway) -> None:
    # About one signature in a hundred has a run of digits that is a Luhn-valid card number.
    payment = await gateway.purchase(HELD)
    while True:
        document = notification_about(payment)
        notification = signed(gateway, HELD, document)
        if contains_card_number(notification.headers["x-anet-signature"]):
            break
    response = await deliver(gateway, HELD, notification)
    assert (response.notification_id, response.duplicate) == (document["notificationId"], False)


async def test_a_notification_delivered_twice_is_processed_once(gateway: Gateway) -> None:
    payment = await gateway.purchase(HELD, amount_minor=900)
    await gateway.simulator.settle()
    # A refund made in the provider's dashboard.
    refund = await gateway.wiring.provider.refund(
        HELD,
        RefundRequest(payment.provider_reference, Money(400, "USD"), payment.account_suffix, ""),
    )
    notice = await gateway.receiver.take_held(HELD, REFUND, refund.transaction_id)
    first, second = [await deliver(gateway, HELD, notice) for _ in range(2)]
    assert (first.duplicate, second.duplicate) == (False, True)
    assert first.notification_id == second.notification_id
    refunded = await gateway.payment_in(HELD, payment.payment_id, res.PAYMENT_STATE_PARTIALLY_REFUNDED)
    assert [r.provider_reference for r in refunded.refunds] == [refund.transaction_id]
    [event] = await gateway.published(payment.payment_id, "payment.refunded", 1)
    assert event.payload.refunded_amount.amount_minor == 400
    rows = await gateway.databases.fetch(
        HELD,
        "SELECT count(*) AS n FROM webhook_notifications WHERE notification_id = $1",
        first.notification_id,
    )
    assert rows[0]["n"] == 1


async def test_a_refund_notice_before_the_capture_notice_waits_for_it(gateway: Gateway) -> None:
    authorized = await gateway.authorize(HELD, amount_minor=1500)
    # Captured and then refunded in the provider's dashboard.
    await gateway.wiring.provider.capture(HELD, authorized.provider_reference, Money(1500, "USD"))
    await gateway.simulator.settle()
    refund = await gateway.wiring.provider.refund(
        HELD,
        RefundRequest(authorized.provider_reference, Money(1500, "USD"), authorized.account_suffix, ""),
    )
    capture_notice = await gateway.receiver.take_held(HELD, PRIOR_AUTH_CAPTURE, authorized.provider_reference)
    refund_notice = await gateway.receiver.take_held(HELD, REFUND, refund.transaction_id)
    # They arrive the wrong way round: the refund's is retried until the capture is recorded.
    await deliver(gateway, HELD, refund_notice)
    await asyncio.sleep(0.3)
    assert (await gateway.payment(HELD, authorized.payment_id)).state == res.PAYMENT_STATE_AUTHORIZED
    await deliver(gateway, HELD, capture_notice)
    refunded = await gateway.payment_in(HELD, authorized.payment_id, res.PAYMENT_STATE_REFUNDED)
    assert refunded.captured_amount.amount_minor == 1500
    assert [(r.amount.amount_minor, r.origin) for r in refunded.refunds] == [
        (1500, res.CHANGE_ORIGIN_PROVIDER)
    ]
    await gateway.event(authorized.payment_id, "payment.captured")
    refunded_event = await gateway.event(authorized.payment_id, "payment.refunded")
    assert refunded_event.payload.total_refunded.amount_minor == 1500
    assert (await gateway.audit(HELD, authorized.payment_id))[-2:] == [
        ("authorized", "captured"),
        ("captured", "refunded"),
    ]
    # Received first, applied last.
    rows = await gateway.databases.fetch(
        HELD,
        """
        SELECT event_type, outcome FROM webhook_notifications
        WHERE entity_id = ANY($1::text[]) AND event_type <> $2 ORDER BY processed_at
        """,
        [authorized.provider_reference, refund.transaction_id],
        AUTHORIZATION,
    )
    assert [(row["event_type"], row["outcome"]) for row in rows] == [
        (PRIOR_AUTH_CAPTURE, "applied"),
        (REFUND, "applied"),
    ]


async def test_a_refund_made_in_the_providers_dashboard_refunds_the_payment(gateway: Gateway) -> None:
    payment = await gateway.purchase(HOOKS, amount_minor=2500)
    await gateway.simulator.settle()
    refund = await gateway.wiring.provider.refund(
        HOOKS,
        RefundRequest(payment.provider_reference, Money(2500, "USD"), payment.account_suffix, ""),
    )
    refunded = await gateway.payment_in(HOOKS, payment.payment_id, res.PAYMENT_STATE_REFUNDED)
    [record] = refunded.refunds
    assert (record.provider_reference, record.origin, record.amount.amount_minor) == (
        refund.transaction_id,
        res.CHANGE_ORIGIN_PROVIDER,
        2500,
    )
    event = await gateway.event(payment.payment_id, "payment.refunded")
    assert (event.payload.refund_id, event.payload.provider_reference) == (
        record.refund_id,
        refund.transaction_id,
    )
    assert event.payload.total_refunded.amount_minor == 2500
    # The provider sends it again, byte for byte: nothing more happens.
    [sent] = [
        n
        for n in (await gateway.simulator.control("GET", "/notifications"))["notifications"]
        if n["eventType"] == REFUND
        and n["delivered"]
        and await _is_about(gateway, HOOKS, n["notificationId"], refund.transaction_id)
    ]
    await gateway.simulator.control("POST", f"/notifications/{sent['notificationId']}/resend")
    await _resent(gateway, sent["notificationId"])
    assert (await gateway.payment(HOOKS, payment.payment_id)).refunds == refunded.refunds
    assert len(await gateway.events_of(payment.payment_id, routing_key="payment.refunded")) == 1


async def test_a_chargeback_reaches_the_payment_and_is_announced(gateway: Gateway) -> None:
    payment = await gateway.purchase(HOOKS, amount_minor=3000)
    await gateway.simulator.settle()
    await gateway.simulator.control(
        "POST",
        f"/transactions/{payment.provider_reference}/chargeback",
        {"amount": "30.00", "disputeId": "dp-1"},
    )
    charged_back = await gateway.payment_in(HOOKS, payment.payment_id, res.PAYMENT_STATE_CHARGED_BACK)
    assert (charged_back.chargeback.chargeback_id, charged_back.chargeback.amount.amount_minor) == (
        "dp-1",
        3000,
    )
    event = await gateway.event(payment.payment_id, "payment.chargeback")
    assert (event.payload.chargeback_id, event.payload.chargeback_amount.amount_minor) == ("dp-1", 3000)


async def test_a_void_made_in_the_providers_dashboard_voids_the_authorization(gateway: Gateway) -> None:
    authorized = await gateway.authorize(HOOKS)
    await gateway.wiring.provider.void(HOOKS, authorized.provider_reference)
    await gateway.payment_in(HOOKS, authorized.payment_id, res.PAYMENT_STATE_VOIDED)
    await gateway.event(authorized.payment_id, "payment.voided")


async def test_a_notification_about_a_charge_tally_did_not_make_is_acknowledged_and_left(
    gateway: Gateway,
) -> None:
    reference = secrets.token_hex(10)
    charge = await gateway.wiring.provider.purchase(
        HOOKS,
        ChargeRequest(Money(500, "USD"), OneTimeToken("COMMON.ACCEPT.INAPP.PAYMENT", "x"), reference, ""),
    )
    assert await gateway.processed_notifications(HOOKS, charge.transaction_id, 1) == [
        (AUTH_CAPTURE, "not_a_tally_payment")
    ]


async def test_a_notification_no_retry_can_apply_is_parked(gateway: Gateway) -> None:
    payment = await gateway.purchase(HELD, amount_minor=700)
    await gateway.simulator.settle()
    refunded = await gateway.call(
        "Refund",
        api.RefundRequest(merchant_id=HELD, request_id=str(uuid.uuid4()), payment_id=payment.payment_id),
    )
    assert refunded.payment.state == res.PAYMENT_STATE_REFUNDED
    # A genuinely signed void of the payment's transaction, which a refunded payment cannot
    # take: ILLEGAL_TRANSITION, parked at once rather than retried.
    document = notification_about(payment, VOID)
    await deliver(gateway, HELD, signed(gateway, HELD, document))
    parked = await _parked(gateway)
    assert parked == [document["notificationId"]]
    rows = await gateway.databases.fetch(
        HELD,
        "SELECT outcome FROM webhook_notifications WHERE notification_id = $1",
        document["notificationId"],
    )
    assert rows[0]["outcome"] is None
    assert await gateway.payment(HELD, payment.payment_id) == refunded.payment


async def _parked(gateway: Gateway) -> list[str]:
    """The notification ids of the webhooks waiting in the consumer's parking queue, taken off it."""
    connection = await aio_pika.connect(gateway.settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(parking_queue_name(consumer_name(gateway.settings)), ensure=False)
        taken: list[str] = []

        async def arrived() -> bool:
            while (message := await queue.get(no_ack=False, fail=False, timeout=5)) is not None:
                payload = unpack_payload(EventEnvelope.FromString(message.body))
                taken.append(json.loads(payload.body.data)["notificationId"])
                await message.ack()
            return bool(taken)

        await eventually(arrived)
        return taken


async def _is_about(gateway: Gateway, merchant_id: str, notification_id: str, transaction_id: str) -> bool:
    rows = await gateway.databases.fetch(
        merchant_id, "SELECT entity_id FROM webhook_notifications WHERE notification_id = $1", notification_id
    )
    return bool(rows) and rows[0]["entity_id"] == transaction_id


async def _resent(gateway: Gateway, notification_id: str) -> None:
    """Wait until the simulator delivered the notification a second time."""

    async def delivered_twice() -> bool:
        sent = (await gateway.simulator.control("GET", "/notifications"))["notifications"]
        return any(
            n["notificationId"] == notification_id and n["attempts"] >= 2 and n["delivered"] for n in sent
        )

    await eventually(delivered_twice)
