"""Request messages -> commands.

Every request but a provider's notification is first searched for card data, in every string
it carries (nested messages, repeated fields and map keys and values included): a card number
(network prefix and Luhn, `domain.refuse_card_data`) or a card security code given with its
label ("CVV 123") is refused with INVALID_ARGUMENT, reason CARD_DATA_NOT_ACCEPTED, naming the
fields and never repeating their values. A request carrying fields this API does not define is
refused too: nothing outside the schema (a `card_number` of another client's making) gets in.

Then each function reads one request, collects every bad field (paths as in the proto, e.g.
`amount.currency`, `payment_source.one_time_token.value`) and raises one InvalidArgument
naming them all, so that no bad input reaches a database or the provider. Rules that need
stored state are the domain's and the servicer's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar
from uuid import UUID

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from tally.common.v1 import money_pb2
from tally.payment_gateway.v1 import payment_gateway_service_pb2 as api
from tally_kit import amounts
from tally_kit.amounts import Money
from tally_kit.errors import FieldViolation, InvalidArgument, Violations
from tally_kit.idempotency import validate_request_id
from tally_kit.pagination import PageRequest, read_page_request
from tally_kit.text import check_text

from tally_payment_gateway import domain, mapping
from tally_payment_gateway.authorize_net import PROVIDER_NAME
from tally_payment_gateway.provider import OneTimeToken
from tally_payment_gateway.store import PaymentFilter

T = TypeVar("T")

USER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
# Order ids: printable ASCII without whitespace.
ORDER_ID_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")
MAX_TOKEN_DESCRIPTOR_LENGTH = 64
MAX_TOKEN_VALUE_LENGTH = 8192
MAX_SAVED_TOKEN_LENGTH = 200
MAX_LABEL_LENGTH = 64
# Authorize.Net's notifications are a few hundred bytes; anything this large is not one.
MAX_WEBHOOK_BODY_BYTES = 64 * 1024
# A card security code given with its label, as a careless client might put it in any text:
# "CVV 123", "cvc2: 1234", "cardCode":"123".
_SECURITY_CODE = re.compile(
    r"(?i)\b(?:cvv2?|cvc2?|cvn|csc|card[\s_-]?code|(?:card[\s_-]?)?security[\s_-]?code)\b\W{0,3}[0-9]{3,4}\b"
)


@dataclass(frozen=True)
class SavedMethod:
    """A payment method the same user saved with SavePaymentMethod."""

    payment_method_id: UUID


@dataclass(frozen=True)
class Charge:
    """A Purchase or an Authorize."""

    merchant_id: str
    request_id: str
    user_id: str
    order_id: str
    product_id: str
    amount: Money
    source: SavedMethod | OneTimeToken
    description: str


@dataclass(frozen=True)
class PaymentRef:
    merchant_id: str
    payment_id: UUID


@dataclass(frozen=True)
class Capture:
    merchant_id: str
    request_id: str
    payment_id: UUID
    # None captures the whole authorized amount.
    amount: Money | None


@dataclass(frozen=True)
class Void:
    merchant_id: str
    request_id: str
    payment_id: UUID


@dataclass(frozen=True)
class Refund:
    merchant_id: str
    request_id: str
    payment_id: UUID
    # None refunds everything still refundable.
    amount: Money | None
    reason: str


@dataclass(frozen=True)
class ListPayments:
    merchant_id: str
    page: PageRequest
    filters: PaymentFilter


@dataclass(frozen=True)
class SavePaymentMethod:
    merchant_id: str
    request_id: str
    user_id: str
    provider_token: str
    label: str


@dataclass(frozen=True)
class ProviderWebhook:
    merchant_id: str
    provider: str
    body: bytes
    headers: dict[str, str]


# --- card data ----------------------------------------------------------------------------


def refuse_card_data(request: Message) -> None:
    """INVALID_ARGUMENT when the request carries card data or fields the API does not define."""
    _refuse_unknown_fields(request)
    texts = list(_strings(request, ""))
    violations = domain.card_data_violations(texts)
    flagged = {violation.field for violation in violations}
    violations += [
        FieldViolation(
            path, "must not contain a card security code: cards are collected by the provider's form"
        )
        for path, text in texts
        if path not in flagged and _SECURITY_CODE.search(text)
    ]
    if violations:
        raise InvalidArgument(violations, reason="CARD_DATA_NOT_ACCEPTED")


def _refuse_unknown_fields(request: Message) -> None:
    if _carries_unknown_fields(request):
        raise InvalidArgument(
            [
                FieldViolation(
                    "request",
                    "carries fields this API does not define; card numbers and security codes are never "
                    "accepted",
                )
            ]
        )


def _strings(message: Message, prefix: str) -> Iterator[tuple[str, str]]:
    """(field path, text) of every string in `message`, at any depth."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                # Keys are data too, but never repeated in a path.
                yield f"{path} (key)", str(key)
                if value_field.type == FieldDescriptor.TYPE_STRING:
                    yield path, item
                elif value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    yield from _strings(item, f"{path}.")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            items = value if field.is_repeated else [value]
            for index, item in enumerate(items):
                yield from _strings(item, f"{path}[{index}]." if field.is_repeated else f"{path}.")
        elif field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                yield from ((f"{path}[{index}]", item) for index, item in enumerate(value))
            else:
                yield path, value


def _carries_unknown_fields(message: Message) -> bool:
    if len(UnknownFieldSet(message)):
        return True
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            items = value.values() if field.message_type.fields_by_name["value"].message_type else []
        else:
            items = value if field.is_repeated else [value]
        if any(_carries_unknown_fields(item) for item in items):
            return True
    return False


# --- field helpers ------------------------------------------------------------------------


def _pattern(
    violations: Violations, field: str, value: str, pattern: re.Pattern[str], description: str
) -> str:
    violations.require(pattern.fullmatch(value) is not None, field, f"must be {description}")
    return value


def _user_id(violations: Violations, value: str, field: str = "user_id") -> str:
    return _pattern(
        violations,
        field,
        value,
        USER_ID_PATTERN,
        "1 to 128 characters from [A-Za-z0-9._:@+-], starting with a letter or digit",
    )


def _order_id(violations: Violations, value: str) -> str:
    return _pattern(
        violations, "order_id", value, ORDER_ID_PATTERN, "1 to 128 printable ASCII characters without spaces"
    )


def _text(violations: Violations, field: str, value: str, max_length: int) -> str | None:
    return violations.rule(field, lambda: check_text(value, max_length))


def _optional_text(violations: Violations, field: str, value: str, max_length: int) -> str:
    """'' when empty; the text, or '' after recording why it is refused."""
    if not value:
        return ""
    return _text(violations, field, value, max_length) or ""


def _money(violations: Violations, field: str, value: money_pb2.Money) -> Money | None:
    amount_ok = violations.require(value.amount_minor > 0, f"{field}.amount_minor", "must be greater than 0")
    currency = violations.rule(f"{field}.currency", lambda: amounts.check_currency(value.currency))
    if not amount_ok or currency is None:
        return None
    return Money(value.amount_minor, currency)


def _optional_money(
    violations: Violations, field: str, present: bool, value: money_pb2.Money
) -> Money | None:
    return _money(violations, field, value) if present else None


# --- payments -----------------------------------------------------------------------------


def charge(request: api.PurchaseRequest | api.AuthorizeRequest) -> Charge:
    refuse_card_data(request)
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    user_id = _user_id(violations, request.user_id)
    order_id = _order_id(violations, request.order_id)
    product_id = violations.uuid("product_id", request.product_id)
    amount = None
    if violations.require(request.HasField("amount"), "amount", "is required"):
        amount = _money(violations, "amount", request.amount)
    source = _payment_source(violations, request)
    description = _optional_text(
        violations, "description", request.description, domain.MAX_DESCRIPTION_LENGTH
    )
    violations.raise_if_any()
    assert product_id is not None and amount is not None and source is not None
    return Charge(
        merchant_id=request.merchant_id,
        request_id=request.request_id,
        user_id=user_id,
        order_id=order_id,
        product_id=str(product_id),
        amount=amount,
        source=source,
        description=description,
    )


def _payment_source(
    violations: Violations, request: api.PurchaseRequest | api.AuthorizeRequest
) -> SavedMethod | OneTimeToken | None:
    source = request.payment_source
    match source.WhichOneof("source"):
        case "payment_method_id":
            method_id = violations.uuid("payment_source.payment_method_id", source.payment_method_id)
            return None if method_id is None else SavedMethod(method_id)
        case "one_time_token":
            token = source.one_time_token
            descriptor = _text(
                violations,
                "payment_source.one_time_token.descriptor",
                token.descriptor,
                MAX_TOKEN_DESCRIPTOR_LENGTH,
            )
            value = _text(
                violations, "payment_source.one_time_token.value", token.value, MAX_TOKEN_VALUE_LENGTH
            )
            if descriptor is None or value is None:
                return None
            return OneTimeToken(descriptor, value)
    violations.add("payment_source", "is required: a payment_method_id or a one_time_token")
    return None


def capture(request: api.CaptureRequest) -> Capture:
    refuse_card_data(request)
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    payment_id = violations.uuid("payment_id", request.payment_id)
    amount = _optional_money(violations, "amount", request.HasField("amount"), request.amount)
    violations.raise_if_any()
    assert payment_id is not None
    return Capture(request.merchant_id, request.request_id, payment_id, amount)


def void(request: api.VoidRequest) -> Void:
    refuse_card_data(request)
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    payment_id = violations.uuid("payment_id", request.payment_id)
    violations.raise_if_any()
    assert payment_id is not None
    return Void(request.merchant_id, request.request_id, payment_id)


def refund(request: api.RefundRequest) -> Refund:
    refuse_card_data(request)
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    payment_id = violations.uuid("payment_id", request.payment_id)
    amount = _optional_money(violations, "amount", request.HasField("amount"), request.amount)
    reason = _optional_text(violations, "reason", request.reason, domain.MAX_REFUND_REASON_LENGTH)
    violations.raise_if_any()
    assert payment_id is not None
    return Refund(request.merchant_id, request.request_id, payment_id, amount, reason)


def get_payment(request: api.GetPaymentRequest) -> PaymentRef:
    refuse_card_data(request)
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    payment_id = violations.uuid("payment_id", request.payment_id)
    violations.raise_if_any()
    assert payment_id is not None
    return PaymentRef(request.merchant_id, payment_id)


def list_payments(request: api.ListPaymentsRequest) -> ListPayments:
    refuse_card_data(request)
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    user_id = _user_id(violations, request.user_id) if request.user_id else None
    order_id = _order_id(violations, request.order_id) if request.order_id else None
    state = None
    if request.state:
        state = mapping.PAYMENT_STATES.get(request.state)
        if state is None:
            violations.add("state", "must be a PaymentState")
    page = read_page_request(
        violations,
        page_size=request.page_size,
        page_token=request.page_token,
        scope={
            "list": "payments",
            "merchant_id": request.merchant_id,
            "user_id": request.user_id,
            "order_id": request.order_id,
            "state": str(request.state),
        },
        key=(datetime, UUID),
    )
    violations.raise_if_any()
    return ListPayments(request.merchant_id, page, PaymentFilter(user_id, order_id, state))


# --- payment methods ----------------------------------------------------------------------


def save_payment_method(
    request: api.SavePaymentMethodRequest, check_saved_token: Callable[[str], None]
) -> SavePaymentMethod:
    """`check_saved_token` is the provider's: RuleViolation unless the token has its form."""
    refuse_card_data(request)
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    validate_request_id(violations, request.request_id)
    user_id = _user_id(violations, request.user_id)
    token = _text(violations, "provider_token", request.provider_token, MAX_SAVED_TOKEN_LENGTH)
    if token is not None:
        violations.rule("provider_token", lambda: check_saved_token(token))
    label = _optional_text(violations, "label", request.label, MAX_LABEL_LENGTH)
    violations.raise_if_any()
    assert token is not None
    return SavePaymentMethod(request.merchant_id, request.request_id, user_id, token, label)


# --- webhooks -----------------------------------------------------------------------------


def provider_webhook(request: api.HandleProviderWebhookRequest) -> ProviderWebhook:
    # Not searched for card data: it is the provider's signed notification, not a caller's
    # input, and its signature (128 hexadecimal digits) or trace headers would now and then
    # hold a run of digits that reads as a card number, refusing a genuine notification on
    # every delivery.
    _refuse_unknown_fields(request)
    violations = Violations()
    violations.merchant_id(request.merchant_id)
    violations.require(request.provider == PROVIDER_NAME, "provider", f"must be {PROVIDER_NAME}")
    body = request.body.data
    if violations.require(bool(body), "body", "is required"):
        violations.require(
            len(body) <= MAX_WEBHOOK_BODY_BYTES, "body", f"must be at most {MAX_WEBHOOK_BODY_BYTES} bytes"
        )
    violations.raise_if_any()
    return ProviderWebhook(request.merchant_id, request.provider, body, dict(request.headers))
