"""The payment state machine under any sequence of requests, answers and provider reports
(hypothesis).

After every step: refunded <= captured <= authorized and a chargeback <= captured; the state
agrees with the amounts; a refused step changes nothing; a step that changes the payment is
one the state diagram allows and leaves exactly one audit record; nothing leaves a final
state; and what the notices announce adds up to what the payment holds (one capture, the
refunds exactly once each).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st
from tally_kit.amounts import Money
from tally_kit.errors import FailedPrecondition, InvalidArgument
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
    OutcomeUnknown,
    Payment,
    PaymentState,
    ProviderCaptured,
    ProviderRefunded,
    ProviderVoided,
    Refused,
    ReviewApproved,
    ReviewDeclined,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)
AUTHORIZED_AMOUNT = 1000

S = PaymentState
# The diagram: (state before, event) -> the states the event may lead to. Anything else that
# changes a payment is a bug.
REFUND_STATES = {S.PARTIALLY_REFUNDED, S.REFUNDED}
ALLOWED: dict[tuple[PaymentState, type], set[PaymentState]] = {
    (S.PENDING, Approved): {S.AUTHORIZED, S.CAPTURED},
    (S.PENDING, Held): {S.PENDING},
    (S.PENDING, Refused): {S.FAILED},
    (S.PENDING, OutcomeUnknown): {S.UNKNOWN},
    (S.PENDING, ReviewApproved): {S.AUTHORIZED, S.CAPTURED},
    (S.PENDING, ReviewDeclined): {S.FAILED},
    (S.UNKNOWN, Approved): {S.AUTHORIZED, S.CAPTURED, S.VOIDED, *REFUND_STATES},
    (S.UNKNOWN, Held): {S.PENDING},
    (S.UNKNOWN, Refused): {S.FAILED, S.AUTHORIZED, S.CAPTURED, S.PARTIALLY_REFUNDED},
    (S.AUTHORIZED, BeginCapture): {S.AUTHORIZED},
    (S.AUTHORIZED, BeginVoid): {S.AUTHORIZED},
    (S.AUTHORIZED, Approved): {S.CAPTURED, S.VOIDED},
    (S.AUTHORIZED, Refused): {S.AUTHORIZED},
    (S.AUTHORIZED, OutcomeUnknown): {S.UNKNOWN},
    (S.AUTHORIZED, ProviderCaptured): {S.CAPTURED},
    (S.AUTHORIZED, ProviderVoided): {S.VOIDED},
    (S.CAPTURED, BeginRefund): {S.CAPTURED},
    (S.CAPTURED, Approved): REFUND_STATES,
    (S.CAPTURED, Refused): {S.CAPTURED},
    (S.CAPTURED, OutcomeUnknown): {S.UNKNOWN},
    (S.CAPTURED, ProviderVoided): {S.REFUNDED},
    (S.CAPTURED, ProviderRefunded): REFUND_STATES,
    (S.CAPTURED, ChargedBack): {S.CHARGED_BACK},
    (S.PARTIALLY_REFUNDED, BeginRefund): {S.PARTIALLY_REFUNDED},
    (S.PARTIALLY_REFUNDED, Approved): REFUND_STATES,
    (S.PARTIALLY_REFUNDED, Refused): {S.PARTIALLY_REFUNDED},
    (S.PARTIALLY_REFUNDED, OutcomeUnknown): {S.UNKNOWN},
    (S.PARTIALLY_REFUNDED, ProviderRefunded): REFUND_STATES,
    (S.PARTIALLY_REFUNDED, ChargedBack): {S.CHARGED_BACK},
}

# Amounts around the edges of the authorized amount, including refused ones.
_amounts = st.sampled_from([250, 500, 1000, 1, 400, 999, 0, -1, 1001])
_references = st.sampled_from(["txn-1", "txn-2", "refund-1", "refund-2", "refund-3"])
_approved = st.builds(Approved, _references, st.just("XXXX1111"), st.just("Visa"))
_held = st.builds(Held, _references)
_refused = st.builds(Refused, st.sampled_from([domain.DECLINED, domain.NOT_FOUND_AT_PROVIDER]), st.just("no"))
_unknown = st.just(OutcomeUnknown())
_review = st.one_of(st.just(ReviewApproved()), st.builds(ReviewDeclined, st.just("declined after review")))
_begin_capture = st.builds(BeginCapture, st.one_of(_amounts, st.none()))
_begin_refund = st.builds(BeginRefund, st.uuids(), st.one_of(_amounts, st.none()), st.just("reason"))
_provider_captured = st.builds(ProviderCaptured, _amounts)
_provider_voided = st.builds(ProviderVoided, st.uuids())
_provider_refunded = st.builds(ProviderRefunded, st.uuids(), _references, _amounts)
_charged_back = st.builds(ChargedBack, st.sampled_from(["cb-1", "cb-2"]), _amounts)
ANY_EVENT = st.one_of(
    _approved,
    _held,
    _refused,
    _unknown,
    _review,
    _begin_capture,
    st.just(BeginVoid()),
    _begin_refund,
    _provider_captured,
    _provider_voided,
    _provider_refunded,
    _charged_back,
)
_after_capture = st.one_of(
    _begin_refund, _approved, _refused, _unknown, _provider_refunded, _provider_voided, _charged_back
)
# Half the steps are drawn among those that make sense in the current state, so that
# sequences reach refunds, chargebacks and the unknown outcomes of later calls; the other
# half among every event, which the state mostly refuses.
LIKELY_EVENTS: dict[PaymentState, st.SearchStrategy[domain.Event]] = {
    S.PENDING: st.one_of(_approved, _held, _refused, _unknown, _review),
    S.UNKNOWN: st.one_of(_approved, _held, _refused),
    S.AUTHORIZED: st.one_of(
        _begin_capture,
        st.just(BeginVoid()),
        _approved,
        _refused,
        _unknown,
        _provider_captured,
        _provider_voided,
    ),
    S.CAPTURED: _after_capture,
    S.PARTIALLY_REFUNDED: _after_capture,
}


def _check_amounts(payment: Payment) -> None:
    assert 0 <= payment.refunded_minor <= payment.captured_minor <= payment.amount_minor
    assert all(refund.amount_minor > 0 for refund in payment.refunds)
    references = [refund.provider_reference for refund in payment.refunds]
    assert len(references) == len(set(references))
    if payment.chargeback is not None:
        assert 0 < payment.chargeback.amount_minor <= payment.captured_minor
    if payment.state in (S.PENDING, S.AUTHORIZED, S.VOIDED, S.FAILED):
        assert payment.captured_minor == 0
    if payment.state is S.CAPTURED:
        assert payment.captured_minor > 0 and payment.refunded_minor == 0
    if payment.state is S.PARTIALLY_REFUNDED:
        assert 0 < payment.refunded_minor < payment.captured_minor
    if payment.state is S.REFUNDED:
        assert payment.refunded_minor == payment.captured_minor > 0
    assert (payment.state is S.CHARGED_BACK) == (payment.chargeback is not None)
    if payment.state is S.UNKNOWN:
        assert payment.pending is not None
    if payment.held_for_review:
        assert payment.state is S.PENDING and payment.pending is None


@settings(max_examples=400, deadline=None)
@given(intent=st.sampled_from(Intent), length=st.integers(0, 16), data=st.data())
def test_any_sequence_keeps_the_payment_consistent(intent: Intent, length: int, data: st.DataObject) -> None:
    opened = domain.open_payment(
        payment_id=UUID(int=1),
        merchant_id="acme",
        user_id="user-1",
        order_id="order-1",
        product_id="product-1",
        intent=intent,
        amount=Money(AUTHORIZED_AMOUNT, "USD"),
        provider="authorize_net",
        change=Change("app:acme", "corr", T0),
    )
    payment = opened.payment
    captured_notices = 0
    announced_refunds: list[int] = []
    for step in range(1, length + 1):
        likely = LIKELY_EVENTS.get(payment.state, ANY_EVENT)
        event = data.draw(st.one_of(likely, ANY_EVENT), label=f"event {step}")
        change = Change("actor", f"corr-{step}", T0 + timedelta(seconds=step))
        try:
            result = domain.transition(payment, event, change)
        except (FailedPrecondition, InvalidArgument):
            continue
        before, after = payment, result.payment
        if before.state in domain.FINAL_STATES:
            assert after == before and result.audit is None and result.notices == ()
        if result.audit is None:
            assert after == before and result.notices == ()
        else:
            assert after.state in ALLOWED.get((before.state, type(event)), set()), (before.state, event)
            assert (result.audit.state_before, result.audit.state_after) == (before.state, after.state)
            assert (result.audit.correlation_id, result.audit.at) == (change.correlation_id, change.at)
            assert after.updated_at == change.at
        for notice in result.notices:
            if notice.kind is NoticeKind.CAPTURED:
                captured_notices += 1
                assert after.state is S.CAPTURED
            if notice.kind is NoticeKind.REFUNDED:
                assert notice.refund is not None and notice.refund in after.refunds
                announced_refunds.append(notice.refund.amount_minor)
        _check_amounts(after)
        payment = after
    assert captured_notices == (1 if payment.captured_minor else 0)
    assert sum(announced_refunds) == payment.refunded_minor
