"""The events the payment gateway publishes: the API and event protos follow the house
conventions, and each notice of the domain becomes the message the ledger expects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from google.api import annotations_pb2
from google.protobuf.message import Message
from tally.common.v1 import access_pb2
from tally.payment_gateway.v1 import events_pb2, payment_gateway_service_pb2
from tally_kit.amounts import Money
from tally_payment_gateway import domain, events
from tally_payment_gateway.domain import (
    Approved,
    BeginRefund,
    BeginVoid,
    Change,
    ChargedBack,
    Intent,
    NoticeKind,
    Payment,
    ProviderRefunded,
    Refused,
    Transition,
)

SERVICE = payment_gateway_service_pb2.DESCRIPTOR.services_by_name["PaymentGatewayService"]
T0 = datetime(2030, 1, 1, tzinfo=UTC)
PAYMENT_ID = UUID("6f1c2a4e-8b3d-4f5a-9c7e-1d2b3a4c5d6e")
REFUND_IDS = (UUID(int=1), UUID(int=2))


def test_every_rpc_has_a_route_and_an_access_policy() -> None:
    for method in SERVICE.methods:
        options = method.GetOptions()
        assert options.Extensions[annotations_pb2.http].WhichOneof("pattern") in ("get", "post"), method.name
        assert options.HasExtension(access_pb2.access), method.name
        roles = set(options.Extensions[access_pb2.access].roles)
        # The webhook is authenticated by the provider's signature, every other RPC by a token.
        assert bool(roles) == (method.name != "HandleProviderWebhook"), method.name


def test_requests_name_the_merchant_first_and_mutations_carry_a_request_id() -> None:
    for method in SERVICE.methods:
        fields = method.input_type.fields_by_name
        assert fields["merchant_id"].number == 1, method.name
        mutating = method.GetOptions().Extensions[annotations_pb2.http].WhichOneof("pattern") == "post"
        # Webhooks are deduplicated on the provider's notification id instead.
        expected = mutating and method.name != "HandleProviderWebhook"
        assert ("request_id" in fields) == expected, method.name


def test_every_event_message_has_a_routing_key() -> None:
    published = {payload.DESCRIPTOR.full_name for payload in events.PAYLOAD_TYPES.values()}
    assert published == {m.full_name for m in events_pb2.DESCRIPTOR.message_types_by_name.values()}
    assert all(key.startswith("payment.") for key in events.PAYLOAD_TYPES)
    assert set(events.ROUTING_KEYS) == set(NoticeKind)


def _at(minutes: int) -> Change:
    return Change("app:acme", "corr", T0 + timedelta(minutes=minutes))


def _purchase() -> Transition:
    opened = domain.open_payment(
        payment_id=PAYMENT_ID,
        merchant_id="acme",
        user_id="user-1",
        order_id="order-1",
        product_id="product-1",
        intent=Intent.PURCHASE,
        amount=Money(1000, "USD"),
        provider="authorize_net",
        change=_at(0),
    )
    return domain.transition(opened.payment, Approved("txn-1", "XXXX1111", "Visa"), _at(1))


def _only_event(step: Transition) -> tuple[str, Message]:
    (notice,) = step.notices
    return events.event_for(step.payment, notice)


def _order_fields(message: Any) -> tuple[str, str, str, str, str]:
    """The fields every payment event carries about its order."""
    return (message.merchant_id, message.user_id, message.order_id, message.product_id, message.payment_id)


ORDER = ("acme", "user-1", "order-1", "product-1", str(PAYMENT_ID))


def test_a_capture_is_announced_with_the_order_the_ledger_settles() -> None:
    key, message = _only_event(_purchase())
    assert key == events.PAYMENT_CAPTURED
    assert isinstance(message, events_pb2.PaymentCaptured)
    assert _order_fields(message) == ORDER
    assert (message.amount.amount_minor, message.amount.currency) == (1000, "USD")
    assert message.provider_reference == "txn-1"
    assert message.capture_time.ToDatetime(UTC) == T0 + timedelta(minutes=1)


def _refunded(
    payment: Payment, refund_id: UUID, amount_minor: int, reference: str, minute: int
) -> Transition:
    started = domain.transition(payment, BeginRefund(refund_id, amount_minor), _at(minute))
    return domain.transition(started.payment, Approved(reference), _at(minute))


def test_each_refund_is_announced_with_the_total_refunded_so_far() -> None:
    first = _refunded(_purchase().payment, REFUND_IDS[0], 300, "refund-1", 2)
    key, message = _only_event(first)
    assert key == events.PAYMENT_REFUNDED
    assert isinstance(message, events_pb2.PaymentRefunded)
    assert _order_fields(message) == ORDER
    assert (message.refund_id, message.provider_reference) == (str(REFUND_IDS[0]), "refund-1")
    assert message.amount.amount_minor == 1000
    assert (message.refunded_amount.amount_minor, message.total_refunded.amount_minor) == (300, 300)
    second = _refunded(first.payment, REFUND_IDS[1], 700, "refund-2", 3)
    _, message = _only_event(second)
    assert isinstance(message, events_pb2.PaymentRefunded)
    assert (message.refunded_amount.amount_minor, message.total_refunded.amount_minor) == (700, 1000)
    # Announcing the first refund again (the outbox relaying late) still says what it said.
    _, replayed = events.event_for(second.payment, first.notices[0])
    assert isinstance(replayed, events_pb2.PaymentRefunded)
    assert replayed.total_refunded.amount_minor == 300


def test_a_chargeback_is_announced_with_its_amount() -> None:
    partly = domain.transition(_purchase().payment, ProviderRefunded(REFUND_IDS[0], "refund-1", 200), _at(2))
    key, message = _only_event(domain.transition(partly.payment, ChargedBack("cb-1", 1000), _at(3)))
    assert key == events.PAYMENT_CHARGEBACK
    assert isinstance(message, events_pb2.PaymentChargeback)
    assert (message.chargeback_id, message.chargeback_amount.amount_minor) == ("cb-1", 1000)
    assert (message.amount.amount_minor, message.provider_reference) == (1000, "txn-1")


def test_a_void_and_a_failure_are_announced() -> None:
    opened = domain.open_payment(
        payment_id=PAYMENT_ID,
        merchant_id="acme",
        user_id="user-1",
        order_id="order-1",
        product_id="product-1",
        intent=Intent.AUTHORIZE,
        amount=Money(1000, "USD"),
        provider="authorize_net",
        change=_at(0),
    )
    authorized = domain.transition(opened.payment, Approved("txn-1"), _at(1)).payment
    voiding = domain.transition(authorized, BeginVoid(), _at(2)).payment
    key, voided = _only_event(domain.transition(voiding, Approved("txn-1"), _at(3)))
    assert key == events.PAYMENT_VOIDED
    assert isinstance(voided, events_pb2.PaymentVoided)
    assert (voided.amount.amount_minor, voided.provider_reference) == (1000, "txn-1")

    declined = domain.transition(
        opened.payment, Refused(domain.DECLINED, "This transaction has been declined."), _at(1)
    )
    key, failed = _only_event(declined)
    assert key == events.PAYMENT_FAILED
    assert isinstance(failed, events_pb2.PaymentFailed)
    assert _order_fields(failed) == ORDER
    assert (failed.failure_code, failed.failure_message) == (
        domain.DECLINED,
        "This transaction has been declined.",
    )
