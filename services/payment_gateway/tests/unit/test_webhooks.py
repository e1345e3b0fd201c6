"""Authorize.Net webhook signatures (HMAC-SHA512 over the raw body) and notification parsing."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pydantic import SecretStr
from tally_kit.errors import InvalidArgument
from tally_payment_gateway import webhooks
from tally_payment_gateway.webhooks import WebhookSignatureInvalid

KEY = SecretStr("5D1A" * 32)
BODY = (
    b'{"notificationId":"d0e8e7fe-c3e7-4add-a480-27bc5ce28a18",'
    b'"eventType":"net.authorize.payment.authcapture.created",'
    b'"eventDate":"2030-01-01T12:00:00.0080095Z","webhookId":"63d6fea2-aa13-4b1d-a204-f5fbc15942b7",'
    b'"payload":{"responseCode":1,"authCode":"LZ6I19","avsResponse":"Y","authAmount":45.10,'
    b'"invoiceNumber":"6f1c2a4e8b3d4f5a9c7e","entityName":"transaction","id":"60020981676"}}'
)


def _signature(body: bytes, key: str = KEY.get_secret_value()) -> str:
    """What Authorize.Net sends: upper-case hex of the HMAC-SHA512 keyed with the key's characters."""
    return "sha512=" + hmac.new(key.encode(), body, hashlib.sha512).hexdigest().upper()


def test_the_signature_authorize_net_sends_is_accepted() -> None:
    webhooks.verify_signature(BODY, {"X-ANET-Signature": _signature(BODY)}, KEY)


def test_the_digest_and_the_header_name_are_read_whatever_their_case() -> None:
    lower = _signature(BODY).lower()
    webhooks.verify_signature(BODY, {"x-anet-signature": lower}, KEY)
    webhooks.verify_signature(BODY, {"X-Anet-Signature": "SHA512=" + lower.removeprefix("sha512=")}, KEY)


def test_a_missing_signature_is_refused() -> None:
    with pytest.raises(WebhookSignatureInvalid) as refused:
        webhooks.verify_signature(BODY, {"content-type": "application/json"}, KEY)
    assert refused.value.reason == "WEBHOOK_SIGNATURE_INVALID"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sha512=",
        "sha256=" + "AB" * 64,
        "sha512=" + "AB" * 63,
        "sha512=" + "ZZ" * 64,
        "AB" * 64,
    ],
)
def test_a_malformed_signature_is_refused(value: str) -> None:
    with pytest.raises(WebhookSignatureInvalid):
        webhooks.verify_signature(BODY, {"x-anet-signature": value}, KEY)


def test_a_signature_made_with_another_key_is_refused() -> None:
    with pytest.raises(WebhookSignatureInvalid):
        webhooks.verify_signature(BODY, {"x-anet-signature": _signature(BODY, "OTHER" * 8)}, KEY)


def test_the_key_is_used_as_its_characters_not_as_the_bytes_its_hex_spells() -> None:
    digest = hmac.new(bytes.fromhex(KEY.get_secret_value()), BODY, hashlib.sha512).hexdigest()
    with pytest.raises(WebhookSignatureInvalid):
        webhooks.verify_signature(BODY, {"x-anet-signature": "sha512=" + digest}, KEY)


def test_a_body_serialized_again_no_longer_matches_its_signature() -> None:
    signature = _signature(BODY)
    reserialized = json.dumps(json.loads(BODY), indent=None).encode()
    assert json.loads(reserialized) == json.loads(BODY)
    with pytest.raises(WebhookSignatureInvalid):
        webhooks.verify_signature(reserialized, {"x-anet-signature": signature}, KEY)


def test_a_body_altered_by_one_byte_is_refused() -> None:
    altered = BODY.replace(b"45.10", b"45.11")
    with pytest.raises(WebhookSignatureInvalid):
        webhooks.verify_signature(altered, {"x-anet-signature": _signature(BODY)}, KEY)


def test_a_payment_notification_is_read_with_its_exact_amount() -> None:
    notification = webhooks.parse_notification(BODY)
    assert notification.notification_id == "d0e8e7fe-c3e7-4add-a480-27bc5ce28a18"
    assert notification.event_type == webhooks.AUTH_CAPTURE_CREATED
    assert notification.event_date == datetime(2030, 1, 1, 12, 0, 0, 8009, tzinfo=UTC)
    assert (notification.entity_name, notification.entity_id) == ("transaction", "60020981676")
    assert notification.response_code == 1
    assert notification.auth_amount == Decimal("45.10")
    assert isinstance(notification.auth_amount, Decimal)
    assert notification.invoice_number == "6f1c2a4e8b3d4f5a9c7e"
    assert notification.concerns_payment


def test_a_notification_about_something_else_is_read_but_concerns_no_payment() -> None:
    body = json.dumps(
        {
            "notificationId": "n-2",
            "eventType": "net.authorize.customer.created",
            "eventDate": "2030-01-01T12:00:00Z",
            "webhookId": "w",
            "payload": {"entityName": "customerProfile", "id": "1512345678"},
        }
    ).encode()
    assert not webhooks.parse_notification(body).concerns_payment


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"eventType": "x", "eventDate": "2030-01-01T12:00:00Z", "payload": {}}',
        b'{"notificationId": "n", "eventType": "x", "eventDate": "yesterday", "payload": {}}',
        b'{"notificationId": "n", "eventType": "x", "eventDate": "2030-01-01T12:00:00Z"}',
        b'{"notificationId": "n", "eventType": "x", "eventDate": "2030-01-01T12:00:00Z",'
        b' "payload": {"authAmount": "45.10"}}',
    ],
)
def test_a_body_that_is_not_a_notification_is_refused(body: bytes) -> None:
    with pytest.raises(InvalidArgument) as refused:
        webhooks.parse_notification(body)
    assert refused.value.reason == "WEBHOOK_NOTIFICATION_INVALID"
