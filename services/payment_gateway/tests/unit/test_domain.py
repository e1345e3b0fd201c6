"""The payment state machine step by step, amounts in minor units, and card data refusal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tally_kit.amounts import Money
from tally_kit.errors import FailedPrecondition, InvalidArgument, RuleViolation
from tally_payment_gateway import domain
from tally_payment_gateway.domain import (
    Approved,
    BeginCapture,
    BeginRefund,
    BeginVoid,
    Change,
    ChargedBack,
    Held,
    Intent,
    NoticeKind,
    Operation,
    Origin,
    OutcomeUnknown,
    Payment,
    PaymentState,
    ProviderCaptured,
    ProviderRefunded,
    ProviderVoided,
    Refused,
    ReviewApproved,
    ReviewDeclined,
    Transition,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)
PAYMENT_ID = UUID("6f1c2a4e-8b3d-4f5a-9c7e-1d2b3a4c5d6e")


def _change(minutes: int = 0, actor: str = "app:acme") -> Change:
    return Change(actor=actor, correlation_id="corr-1", at=T0 + timedelta(minutes=minutes))


def _open(intent: Intent = Intent.PURCHASE, amount_minor: int = 1000) -> Payment:
    opened = domain.open_payment(
        payment_id=PAYMENT_ID,
        merchant_id="acme",
        user_id="user-1",
        order_id="order-1",
        product_id="product-1",
        intent=intent,
        amount=Money(amount_minor, "USD"),
        provider="authorize_net",
        change=_change(),
    )
    return opened.payment


def _step(payment: Payment, event: domain.Event, minutes: int = 1) -> Transition:
    return domain.transition(payment, event, _change(minutes))


def _authorized(amount_minor: int = 1000) -> Payment:
    return _step(_open(Intent.AUTHORIZE, amount_minor), Approved("txn-1", "XXXX1111", "Visa")).payment


def _captured(amount_minor: int = 1000) -> Payment:
    return _step(_open(Intent.PURCHASE, amount_minor), Approved("txn-1", "XXXX1111", "Visa")).payment


def test_opening_records_a_pending_first_call_with_its_audit() -> None:
    opened = domain.open_payment(
        payment_id=PAYMENT_ID,
        merchant_id="acme",
        user_id="user-1",
        order_id="order-1",
        product_id="product-1",
        intent=Intent.AUTHORIZE,
        amount=Money(1000, "USD"),
        provider="authorize_net",
        change=_change(),
    )
    payment = opened.payment
    assert payment.state is PaymentState.PENDING
    assert payment.pending is not None and payment.pending.operation is Operation.AUTHORIZE
    assert payment.provider_order_reference == PAYMENT_ID.hex[:20]
    assert opened.audit is not None
    assert (opened.audit.state_before, opened.audit.state_after) == (None, PaymentState.PENDING)
    assert (opened.audit.action, opened.audit.actor, opened.audit.correlation_id) == (
        "authorize_started",
        "app:acme",
        "corr-1",
    )
    assert opened.notices == ()


@pytest.mark.parametrize("amount", [Money(0, "USD"), Money(-5, "USD")])
def test_opening_refuses_amounts_not_above_zero(amount: Money) -> None:
    with pytest.raises(InvalidArgument):
        domain.open_payment(
            payment_id=uuid4(),
            merchant_id="acme",
            user_id="u",
            order_id="o",
            product_id="p",
            intent=Intent.PURCHASE,
            amount=amount,
            provider="authorize_net",
            change=_change(),
        )


def test_an_approved_purchase_is_captured_and_announced() -> None:
    step = _step(_open(Intent.PURCHASE), Approved("txn-1", "XXXX1111", "Visa"))
    payment = step.payment
    assert payment.state is PaymentState.CAPTURED
    assert (payment.captured_minor, payment.provider_reference) == (1000, "txn-1")
    assert (payment.account_suffix, payment.account_type) == ("XXXX1111", "Visa")
    assert payment.pending is None
    assert [n.kind for n in step.notices] == [NoticeKind.CAPTURED]
    assert step.audit is not None and step.audit.action == "purchase_approved"
    assert (step.audit.state_before, step.audit.state_after) == (PaymentState.PENDING, PaymentState.CAPTURED)


def test_an_approved_authorization_holds_the_money_without_announcing_it() -> None:
    step = _step(_open(Intent.AUTHORIZE), Approved("txn-1"))
    assert step.payment.state is PaymentState.AUTHORIZED
    assert step.payment.captured_minor == 0
    assert step.notices == ()


def test_a_declined_purchase_fails_with_its_reason() -> None:
    step = _step(_open(), Refused(domain.DECLINED, "This transaction has been declined."))
    assert step.payment.state is PaymentState.FAILED
    assert step.payment.failure_code == domain.DECLINED
    assert [n.kind for n in step.notices] == [NoticeKind.FAILED]


def test_a_partial_capture_takes_less_and_releases_the_rest() -> None:
    started = _step(_authorized(), BeginCapture(600))
    assert started.payment.state is PaymentState.AUTHORIZED
    assert started.payment.pending is not None and started.payment.pending.amount_minor == 600
    assert started.audit is not None and started.audit.action == "capture_started"
    done = _step(started.payment, Approved("txn-1"), minutes=2)
    assert done.payment.state is PaymentState.CAPTURED
    assert done.payment.captured_minor == 600
    assert [n.kind for n in done.notices] == [NoticeKind.CAPTURED]
    with pytest.raises(FailedPrecondition) as refused:
        _step(done.payment, BeginCapture(400), minutes=3)
    assert refused.value.reason == "PAYMENT_NOT_CAPTURABLE"


def test_a_capture_above_the_authorization_is_refused() -> None:
    with pytest.raises(FailedPrecondition) as refused:
        _step(_authorized(1000), BeginCapture(1001))
    assert refused.value.reason == "AMOUNT_EXCEEDS_AUTHORIZED"


def test_void_releases_an_authorization_and_nothing_else() -> None:
    started = _step(_authorized(), BeginVoid())
    done = _step(started.payment, Approved("txn-1"), minutes=2)
    assert done.payment.state is PaymentState.VOIDED
    assert [n.kind for n in done.notices] == [NoticeKind.VOIDED]
    with pytest.raises(FailedPrecondition) as refused:
        _step(_captured(), BeginVoid())
    assert refused.value.reason == "PAYMENT_NOT_VOIDABLE"


def test_refunds_add_up_to_what_was_captured_and_no_further() -> None:
    first_id, second_id = uuid4(), uuid4()
    started = _step(_captured(1000), BeginRefund(first_id, 300, "unhappy"))
    first = _step(started.payment, Approved("refund-1"), minutes=2)
    assert first.payment.state is PaymentState.PARTIALLY_REFUNDED
    assert first.notices[0].refund is not None
    assert (first.notices[0].refund.refund_id, first.notices[0].refund.amount_minor) == (first_id, 300)
    assert first.notices[0].refund.origin is Origin.TALLY
    with pytest.raises(FailedPrecondition) as refused:
        _step(first.payment, BeginRefund(uuid4(), 701), minutes=3)
    assert refused.value.reason == "AMOUNT_EXCEEDS_REFUNDABLE"
    rest = _step(first.payment, BeginRefund(second_id), minutes=3)
    assert rest.payment.pending is not None and rest.payment.pending.amount_minor == 700
    done = _step(rest.payment, Approved("refund-2"), minutes=4)
    assert done.payment.state is PaymentState.REFUNDED
    assert done.payment.refunded_minor == 1000
    with pytest.raises(FailedPrecondition) as final:
        _step(done.payment, BeginRefund(uuid4(), 1), minutes=5)
    assert final.value.reason == "PAYMENT_NOT_REFUNDABLE"


def test_an_authorization_cannot_be_refunded() -> None:
    with pytest.raises(FailedPrecondition) as refused:
        _step(_authorized(), BeginRefund(uuid4()))
    assert refused.value.reason == "PAYMENT_NOT_REFUNDABLE"


def test_one_operation_at_a_time() -> None:
    started = _step(_authorized(), BeginCapture())
    with pytest.raises(FailedPrecondition) as busy:
        _step(started.payment, BeginVoid(), minutes=2)
    assert busy.value.reason == "PAYMENT_BUSY"
    assert busy.value.metadata == {"pending_operation": "capture"}


def test_a_refused_capture_leaves_the_authorization_as_it_was() -> None:
    started = _step(_authorized(), BeginCapture())
    step = _step(started.payment, Refused(domain.PROVIDER_ERROR, "(311) already captured"), minutes=2)
    assert step.payment.state is PaymentState.AUTHORIZED
    assert step.payment.pending is None
    assert step.payment.failure_code == domain.PROVIDER_ERROR
    assert step.notices == ()
    assert step.audit is not None and step.audit.action == "capture_refused"


def test_no_answer_makes_the_payment_unknown_until_the_provider_is_asked() -> None:
    unknown = _step(_open(), OutcomeUnknown())
    assert unknown.payment.state is PaymentState.UNKNOWN
    assert unknown.audit is not None and unknown.audit.action == "purchase_unknown"
    assert _step(unknown.payment, OutcomeUnknown(), minutes=2).audit is None
    with pytest.raises(FailedPrecondition) as refused:
        _step(unknown.payment, BeginRefund(uuid4()), minutes=2)
    assert refused.value.reason == "PAYMENT_OUTCOME_UNKNOWN"
    # The provider shows the charge took place: captured, exactly as if it had answered.
    found = _step(unknown.payment, Approved("txn-9"), minutes=3)
    assert found.payment.state is PaymentState.CAPTURED
    assert [n.kind for n in found.notices] == [NoticeKind.CAPTURED]
    # Or it shows nothing: the first call failed.
    missing = _step(unknown.payment, Refused(domain.NOT_FOUND_AT_PROVIDER, "no transaction"), minutes=3)
    assert missing.payment.state is PaymentState.FAILED


def test_an_unknown_refund_found_missing_goes_back_to_captured() -> None:
    started = _step(_captured(), BeginRefund(uuid4(), 400))
    unknown = _step(started.payment, OutcomeUnknown(), minutes=2)
    assert unknown.payment.state is PaymentState.UNKNOWN
    back = _step(unknown.payment, Refused(domain.NOT_FOUND_AT_PROVIDER, "no refund"), minutes=3)
    assert back.payment.state is PaymentState.CAPTURED
    assert back.payment.refunded_minor == 0


def test_a_held_purchase_waits_for_the_review() -> None:
    held = _step(_open(), Held("txn-1", "XXXX0027", "Visa"))
    assert held.payment.state is PaymentState.PENDING
    assert held.payment.held_for_review and held.payment.pending is None
    assert held.notices == ()
    approved = _step(held.payment, ReviewApproved(), minutes=2)
    assert approved.payment.state is PaymentState.CAPTURED
    assert not approved.payment.held_for_review
    assert [n.kind for n in approved.notices] == [NoticeKind.CAPTURED]
    assert _step(approved.payment, ReviewApproved(), minutes=3).audit is None
    declined = _step(held.payment, ReviewDeclined("declined after review"), minutes=2)
    assert declined.payment.state is PaymentState.FAILED
    assert declined.payment.failure_code == domain.REVIEW_DECLINED


def test_a_review_decision_for_a_payment_not_held_is_refused() -> None:
    with pytest.raises(FailedPrecondition) as refused:
        _step(_authorized(), ReviewDeclined())
    assert refused.value.reason == "ILLEGAL_TRANSITION"


def test_a_refund_made_at_the_provider_is_recorded_once() -> None:
    refund_id = uuid4()
    step = _step(_captured(), ProviderRefunded(refund_id, "refund-7", 250))
    assert step.payment.state is PaymentState.PARTIALLY_REFUNDED
    assert step.notices[0].refund is not None and step.notices[0].refund.origin is Origin.PROVIDER
    again = _step(step.payment, ProviderRefunded(uuid4(), "refund-7", 250), minutes=2)
    assert again.audit is None and again.notices == () and again.payment == step.payment


def test_the_webhook_echo_of_a_refund_made_through_tally_changes_nothing() -> None:
    started = _step(_captured(), BeginRefund(uuid4(), 1000))
    done = _step(started.payment, Approved("refund-1"), minutes=2)
    echo = _step(done.payment, ProviderRefunded(uuid4(), "refund-1", 1000), minutes=3)
    assert echo.audit is None and echo.payment == done.payment


def test_an_unknown_refund_answered_with_a_refund_already_recorded_is_no_longer_unknown() -> None:
    reported = _step(_captured(), ProviderRefunded(uuid4(), "refund-3", 250))
    started = _step(reported.payment, BeginRefund(uuid4()), minutes=2)
    unknown = _step(started.payment, OutcomeUnknown(), minutes=3)
    assert unknown.payment.state is PaymentState.UNKNOWN
    settled = _step(unknown.payment, Approved("refund-3"), minutes=4)
    assert settled.payment.state is PaymentState.PARTIALLY_REFUNDED
    assert settled.payment.pending is None and settled.payment.refunded_minor == 250
    assert settled.notices == ()


def test_a_provider_report_waits_while_a_call_is_in_flight() -> None:
    started = _step(_captured(), BeginRefund(uuid4(), 100))
    with pytest.raises(FailedPrecondition) as busy:
        _step(started.payment, ProviderRefunded(uuid4(), "refund-9", 100), minutes=2)
    assert busy.value.reason == "PAYMENT_BUSY"


def test_a_void_at_the_provider_releases_an_authorization() -> None:
    step = _step(_authorized(), ProviderVoided(uuid4()))
    assert step.payment.state is PaymentState.VOIDED
    assert [n.kind for n in step.notices] == [NoticeKind.VOIDED]
    assert _step(step.payment, ProviderVoided(uuid4()), minutes=2).audit is None


def test_a_capture_voided_at_the_provider_is_a_full_refund() -> None:
    refund_id = uuid4()
    step = _step(_captured(), ProviderVoided(refund_id))
    assert step.payment.state is PaymentState.REFUNDED
    assert step.payment.refunded_minor == 1000
    assert [n.kind for n in step.notices] == [NoticeKind.REFUNDED]
    assert step.notices[0].refund is not None and step.notices[0].refund.refund_id == refund_id
    assert _step(step.payment, ProviderVoided(uuid4()), minutes=2).audit is None


def test_a_capture_made_at_the_provider_is_announced_once() -> None:
    step = _step(_authorized(), ProviderCaptured(800))
    assert step.payment.state is PaymentState.CAPTURED
    assert step.payment.captured_minor == 800
    assert [n.kind for n in step.notices] == [NoticeKind.CAPTURED]
    assert _step(step.payment, ProviderCaptured(800), minutes=2).audit is None
    with pytest.raises(FailedPrecondition):
        _step(_authorized(), ProviderCaptured(1001))


def test_a_chargeback_ends_the_payment() -> None:
    refunded = _step(_captured(), ProviderRefunded(uuid4(), "refund-1", 300)).payment
    step = _step(refunded, ChargedBack("cb-1", 1000), minutes=2)
    assert step.payment.state is PaymentState.CHARGED_BACK
    assert step.payment.chargeback is not None and step.payment.chargeback.amount_minor == 1000
    assert [n.kind for n in step.notices] == [NoticeKind.CHARGED_BACK]
    assert _step(step.payment, ChargedBack("cb-1", 1000), minutes=3).audit is None
    with pytest.raises(FailedPrecondition):
        _step(step.payment, ProviderRefunded(uuid4(), "refund-2", 100), minutes=3)
    with pytest.raises(FailedPrecondition):
        _step(_captured(), ChargedBack("cb-2", 1001))


def test_a_provider_answer_without_a_pending_call_is_refused() -> None:
    with pytest.raises(FailedPrecondition) as refused:
        _step(_authorized(), Approved("txn-1"))
    assert refused.value.reason == "ILLEGAL_TRANSITION"


@pytest.mark.parametrize(
    ("amount_minor", "currency", "text"),
    [
        (1234, "USD", "12.34"),
        (5, "USD", "0.05"),
        (100, "EUR", "1.00"),
        (1200, "JPY", "1200"),
        (1234, "KWD", "1.234"),
    ],
)
def test_amounts_convert_exactly_between_minor_units_and_decimal_text(
    amount_minor: int, currency: str, text: str
) -> None:
    assert domain.format_amount(amount_minor, currency) == text
    assert domain.parse_amount(Decimal(text), currency) == amount_minor


@pytest.mark.parametrize(
    ("value", "currency"),
    [(Decimal("12.345"), "USD"), (Decimal("1.5"), "JPY"), (Decimal("-1"), "USD"), (Decimal("NaN"), "USD")],
)
def test_amounts_finer_than_the_minor_unit_or_negative_are_refused(value: Decimal, currency: str) -> None:
    with pytest.raises(RuleViolation):
        domain.parse_amount(value, currency)


@pytest.mark.parametrize(
    "text",
    [
        "4111111111111111",
        "card 4111 1111 1111 1111 please",
        "5555-5555-5555-4444",
        "378282246310005",
        "2223003122003222",
        "6011111111111117",
    ],
)
def test_card_numbers_are_recognised_however_they_are_written(text: str) -> None:
    assert domain.contains_card_number(text)


@pytest.mark.parametrize(
    "text",
    [
        "4111111111111112",  # fails the Luhn check
        "order-20300101-0001",
        "1234567890123452",  # no card network starts with 1
        "41111111111111110000000",  # part of a longer number
        "6f1c2a4e-8b3d-4f5a-9c7e-1d2b3a4c5d6e",
        # A UUID whose last groups line up like an Amex number (374-642577194837), alone and
        # joined to a label by a hyphen.
        "6f1c2a4e-8b3d-4f5a-b374-642577194837",
        "order-6f1c2a4e-8b3d-4f5a-b374-642577194837",
        "sim-approve-6f1c2a4e-8b3d-4f5a-b374-642577194837-retry",
        "123",
    ],
)
def test_other_numbers_are_not_taken_for_cards(text: str) -> None:
    assert not domain.contains_card_number(text)


@given(
    st.uuids(),
    st.sampled_from(["", "order-", "sim-approve-", "ref:", "id="]),
    st.sampled_from(["", "-2", " x"]),
)
def test_no_uuid_is_taken_for_a_card_whatever_it_is_joined_to(
    identifier: UUID, label: str, tail: str
) -> None:
    assert not domain.contains_card_number(f"{label}{identifier}{tail}")


def test_a_request_carrying_a_card_number_is_refused_without_repeating_it() -> None:
    with pytest.raises(InvalidArgument) as refused:
        domain.refuse_card_data([("description", "pay with 4111111111111111"), ("order_id", "order-1")])
    assert refused.value.reason == "CARD_DATA_NOT_ACCEPTED"
    assert [v.field for v in refused.value.violations] == ["description"]
    assert "4111" not in refused.value.message
    domain.refuse_card_data([("description", "ten credits")])
