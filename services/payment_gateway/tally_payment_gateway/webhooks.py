"""Authorize.Net webhooks: checking their signature, reading their notifications.

Authorize.Net signs every notification it posts with the account's Signature Key:
`X-ANET-Signature: sha512=<HEX>`, the HMAC-SHA512 of the raw request body, keyed with the
key's characters as given (not the bytes its hex digits spell). The digest arrives in upper
case; it is compared in constant time whatever its case. The body must be the bytes received:
parsed and serialized again, with other spacing or key order, it no longer matches. A missing,
malformed or wrong signature is refused before anything in the body is read.

A payment notification looks like:

    {"notificationId": "d0e8e7fe-c3e7-4add-a480-27bc5ce28a18",
     "eventType": "net.authorize.payment.authcapture.created",
     "eventDate": "2030-01-01T12:00:00.0080095Z",
     "webhookId": "63d6fea2-aa13-4b1d-a204-f5fbc15942b7",
     "payload": {"responseCode": 1, "authCode": "LZ6I19", "avsResponse": "Y",
                 "authAmount": 45.00, "invoiceNumber": "6f1c2a4e8b3d4f5a9c7e",
                 "entityName": "transaction", "id": "60020981676"}}

It says what happened to which transaction, not the whole truth: the consumer asks the
provider for the transaction's details before changing a payment.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from pydantic import SecretStr
from tally_kit.errors import FieldViolation, InvalidArgument, Unauthenticated

from tally_payment_gateway.authorize_net import parse_utc_time

SIGNATURE_HEADER = "x-anet-signature"
_SIGNATURE = re.compile(r"sha512=([0-9a-f]{128})", re.IGNORECASE)
# Notification ids are UUIDs; anything printable up to this length is accepted.
_MAX_ID_LENGTH = 128

# Authorize.Net's payment event types.
AUTHORIZATION_CREATED = "net.authorize.payment.authorization.created"
AUTH_CAPTURE_CREATED = "net.authorize.payment.authcapture.created"
CAPTURE_CREATED = "net.authorize.payment.capture.created"
PRIOR_AUTH_CAPTURE_CREATED = "net.authorize.payment.priorAuthCapture.created"
REFUND_CREATED = "net.authorize.payment.refund.created"
VOID_CREATED = "net.authorize.payment.void.created"
FRAUD_HELD = "net.authorize.payment.fraud.held"
FRAUD_APPROVED = "net.authorize.payment.fraud.approved"
FRAUD_DECLINED = "net.authorize.payment.fraud.declined"
# Not in Authorize.Net's catalogue, which reports disputes only in its Merchant Interface and
# as the transaction status `chargeback`: the PSP simulator sends it (signed like the others)
# so that chargebacks reach the gateway the way every other change made at the provider does.
# Its payload adds `disputeId`; `authAmount` is the amount charged back.
CHARGEBACK_CREATED = "net.authorize.payment.chargeback.created"

PAYMENT_EVENT_TYPES = frozenset(
    {
        AUTHORIZATION_CREATED,
        AUTH_CAPTURE_CREATED,
        CAPTURE_CREATED,
        PRIOR_AUTH_CAPTURE_CREATED,
        REFUND_CREATED,
        VOID_CREATED,
        FRAUD_HELD,
        FRAUD_APPROVED,
        FRAUD_DECLINED,
        CHARGEBACK_CREATED,
    }
)


class WebhookSignatureInvalid(Unauthenticated):
    default_reason = "WEBHOOK_SIGNATURE_INVALID"


@dataclass(frozen=True)
class Notification:
    notification_id: str
    event_type: str
    event_date: datetime
    webhook_id: str
    # What the notification is about: `transaction` for payment events.
    entity_name: str
    # The transaction's id (for a refund, the refund's own transaction).
    entity_id: str
    response_code: int | None
    # In the currency's major unit, exact, as sent.
    auth_amount: Decimal | None
    invoice_number: str
    # Set for CHARGEBACK_CREATED.
    dispute_id: str

    @property
    def concerns_payment(self) -> bool:
        return self.event_type in PAYMENT_EVENT_TYPES and self.entity_name == "transaction"


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value whatever the case of its name."""
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)


def verify_signature(body: bytes, headers: Mapping[str, str], signature_key: SecretStr) -> None:
    """Refuse with UNAUTHENTICATED unless `X-ANET-Signature` is the HMAC-SHA512 of `body`."""
    value = header(headers, SIGNATURE_HEADER)
    if value is None:
        raise WebhookSignatureInvalid("the notification carries no X-ANET-Signature header")
    match = _SIGNATURE.fullmatch(value.strip())
    if match is None:
        raise WebhookSignatureInvalid("X-ANET-Signature must be sha512= and 128 hexadecimal digits")
    expected = hmac.new(signature_key.get_secret_value().encode(), body, hashlib.sha512).digest()
    # Comparing the decoded bytes ignores the hex digits' case and takes constant time.
    if not hmac.compare_digest(expected, bytes.fromhex(match.group(1))):
        raise WebhookSignatureInvalid("the notification's signature does not match its body")


def parse_notification(body: bytes) -> Notification:
    """The notification in a (verified) body; INVALID_ARGUMENT when it is not one."""
    try:
        document = json.loads(body.decode("utf-8-sig"), parse_float=Decimal)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _invalid("body", "must be a JSON notification") from None
    if not isinstance(document, dict):
        raise _invalid("body", "must be a JSON object")
    payload = document.get("payload")
    if not isinstance(payload, dict):
        raise _invalid("body.payload", "must be an object")
    try:
        event_date = parse_utc_time(_text(document, "eventDate", required=True))
    except ValueError:
        raise _invalid("body.eventDate", "must be an ISO 8601 time") from None
    return Notification(
        notification_id=_text(document, "notificationId", required=True),
        event_type=_text(document, "eventType", required=True),
        event_date=event_date,
        webhook_id=_text(document, "webhookId"),
        entity_name=_text(payload, "entityName"),
        entity_id=_text(payload, "id"),
        response_code=_integer(payload, "responseCode"),
        auth_amount=_amount(payload, "authAmount"),
        invoice_number=_text(payload, "invoiceNumber"),
        dispute_id=_text(payload, "disputeId"),
    )


def _text(document: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = document.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str | int) or isinstance(value, bool) or not str(value).strip():
        raise _invalid(f"body.{key}", "must be a non-empty string")
    text = str(value)
    if len(text) > _MAX_ID_LENGTH:
        raise _invalid(f"body.{key}", f"must be at most {_MAX_ID_LENGTH} characters")
    return text


def _integer(document: dict[str, Any], key: str) -> int | None:
    value = document.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise _invalid(f"body.payload.{key}", "must be a whole number")
    return int(value)


def _amount(document: dict[str, Any], key: str) -> Decimal | None:
    value = document.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        raise _invalid(f"body.payload.{key}", "must be a number")
    amount = Decimal(value)
    if not amount.is_finite() or amount < 0:
        raise _invalid(f"body.payload.{key}", "must be 0 or more")
    return amount


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)], reason="WEBHOOK_NOTIFICATION_INVALID")
