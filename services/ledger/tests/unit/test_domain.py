"""The ledger's pure rules, case by case: conversion and its rounding rule, FIFO, debt and its
settlement, refunds, chargebacks, expiry, adjustments, operations and balances."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID, uuid4

import pytest
from tally_kit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, RuleViolation
from tally_ledger import domain
from tally_ledger.domain import (
    Account,
    EntryKind,
    Lot,
    LotSource,
    LotState,
    Money,
    Operation,
    OperationRate,
    OperationState,
    Posting,
    PurchaseOrder,
    Reversal,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)
MERCHANT = "acme"
USER = "user-1"
RATE = OperationRate("llm.tokens", 3, "token", Decimal("0.002"))


def _ids() -> Iterator[UUID]:
    return (UUID(int=n) for n in itertools.count(1))


def _account(**changes: object) -> Account:
    return dataclasses.replace(domain.new_account(MERCHANT, USER, T0), **changes)


class Books:
    """An account and its lots, changed posting by posting as a store would."""

    def __init__(self) -> None:
        self.account = domain.new_account(MERCHANT, USER, T0)
        self.lots: dict[UUID, Lot] = {}
        self.entries: list[domain.Entry] = []
        self.ids = _ids()

    def new_id(self) -> UUID:
        return next(self.ids)

    def apply(self, posting: Posting) -> Posting:
        assert posting.account_before == self.account
        self.account = posting.account
        self.lots.update((lot.lot_id, lot) for lot in posting.lots)
        self.entries.extend(posting.entries)
        return posting

    def issue(
        self,
        credits: str,
        *,
        at: datetime = T0,
        days: int | None = None,
        source: LotSource = LotSource.GRANT,
        order_id: str | None = None,
    ) -> Lot:
        posting = domain.issue_lot(
            self.account,
            source=source,
            credits=Decimal(credits),
            expires_at=domain.lot_expiry(at, days),
            reference=domain.order_reference(order_id) if order_id else domain.grant_reference(credits),
            now=at,
            product_id=uuid4() if order_id else None,
            order_id=order_id,
            new_id=self.new_id,
        )
        self.apply(posting)
        assert posting.issued_lot is not None
        return self.lots[posting.issued_lot.lot_id]

    def debit(self, resource: str, *, at: datetime = T0) -> Posting:
        operation = domain.open_operation(
            self.account, None, RATE, operation_id=self.new_id(), workflow_id="wf-1", now=at
        )
        closing = domain.record_and_close(
            operation, self.account, self.lots.values(), Decimal(resource), now=at, new_id=self.new_id
        )
        return self.apply(closing.posting)


# --- values and conversion ------------------------------------------------------------------


def test_identifiers_follow_their_patterns() -> None:
    assert domain.check_user_id("user.42@example.com") == "user.42@example.com"
    for bad in ("", "-leading", "has space", "slash/", "x" * 129):
        with pytest.raises(RuleViolation):
            domain.check_user_id(bad)
    assert domain.check_external_id("ORD-2030-0001") == "ORD-2030-0001"
    with pytest.raises(RuleViolation):
        domain.check_external_id("two words")


def test_callers_may_not_choose_sign_up_grant_keys() -> None:
    assert domain.check_grant_key("cashback_pay-1") == "cashback_pay-1"
    with pytest.raises(RuleViolation, match="sign-up"):
        domain.check_grant_key(domain.signup_grant_key(uuid4(), USER))


def test_resource_amounts_are_exact_non_negative_decimals() -> None:
    assert domain.parse_resource_amount("1500") == Decimal(1500)
    assert domain.parse_resource_amount("0.000001") == Decimal("0.000001")
    for bad in ("-1", "1e3", "0.0000001", "NaN"):
        with pytest.raises(RuleViolation):
            domain.parse_resource_amount(bad)


@pytest.mark.parametrize(
    ("resource", "rate", "credits"),
    [
        ("1500", "0.002", "3"),
        ("0", "0.002", "0"),
        ("0.7", "0.000001", "0.000001"),
        # 0.0000025 is a tie: half to even goes down to 0.000002 ...
        ("0.5", "0.000005", "0.000002"),
        # ... and 0.0000035 up to 0.000004, so ties favour neither side.
        ("0.5", "0.000007", "0.000004"),
        ("1.5", "0.000003", "0.000004"),  # 0.0000045
        ("3.5", "0.000003", "0.00001"),  # 0.0000105
        ("1.5", "0.333333", "0.5"),  # 0.4999995
        ("2.25", "0.123457", "0.277778"),  # 0.27777825, no tie: nearest
        # Below half a millionth still costs one millionth: usage is never free.
        ("0.4", "0.000001", "0.000001"),
        ("0.000001", "0.000001", "0.000001"),
    ],
)
def test_credits_are_the_product_rounded_half_to_even_with_a_one_millionth_minimum(
    resource: str, rate: str, credits: str
) -> None:
    assert domain.credits_for(Decimal(resource), Decimal(rate)) == Decimal(credits)


def test_conversion_is_exact_for_the_largest_amounts() -> None:
    big = Decimal("99999999.999999")
    assert domain.credits_for(big, Decimal("1")) == big
    assert domain.credits_for(Decimal("99999999999999.999999"), Decimal("1")) == domain.MAX_CREDITS
    with pytest.raises(RuleViolation, match="more than"):
        domain.credits_for(Decimal("99999999999999.999999"), Decimal("1.000001"))
    with pytest.raises(RuleViolation):
        domain.credits_for(Decimal(-1), Decimal(1))


# --- lots, FIFO -----------------------------------------------------------------------------


def test_lots_expire_access_period_days_after_issue_or_never() -> None:
    assert domain.lot_expiry(T0, 30) == T0 + timedelta(days=30)
    assert domain.lot_expiry(T0, None) is None


def test_fifo_takes_soonest_expiry_first_never_expiring_last_and_ties_by_issue() -> None:
    books = Books()
    forever = books.issue("5")
    late = books.issue("5", days=30)
    soon_later_issued = books.issue("5", at=T0 + timedelta(days=1), days=9)  # expires day 10
    soon = books.issue("5", days=10)  # expires day 10 too, issued earlier
    now = T0 + timedelta(days=2)
    plan = domain.plan_fifo(books.lots.values(), Decimal("17"), now)
    assert [t.lot_id for t in plan.takes] == [
        soon.lot_id,
        soon_later_issued.lot_id,
        late.lot_id,
        forever.lot_id,
    ]
    assert [t.amount for t in plan.takes] == [Decimal(5), Decimal(5), Decimal(5), Decimal(2)]
    assert plan.uncovered == 0


def test_fifo_skips_lots_past_expiry_even_before_the_expiry_job() -> None:
    books = Books()
    expired = books.issue("5", days=1)
    live = books.issue("5")
    plan = domain.plan_fifo(books.lots.values(), Decimal("8"), T0 + timedelta(days=1))
    assert [t.lot_id for t in plan.takes] == [live.lot_id]
    assert plan.uncovered == Decimal(3)
    assert domain.lots_past_expiry(books.lots.values(), T0 + timedelta(days=1)) == [expired]


def test_lot_states() -> None:
    books = Books()
    lot = books.issue("5", days=1)
    assert domain.lot_state(lot, T0) is LotState.ACTIVE
    assert domain.lot_state(lot, T0 + timedelta(days=1)) is LotState.EXPIRED
    assert domain.lot_state(dataclasses.replace(lot, remaining=Decimal(0)), T0) is LotState.DEPLETED
    assert domain.lot_state(dataclasses.replace(lot, reversal=Reversal.REFUNDED), T0) is LotState.REFUNDED
    charged_back = dataclasses.replace(lot, reversal=Reversal.CHARGED_BACK)
    assert domain.lot_state(charged_back, T0) is LotState.CHARGED_BACK


def test_a_lot_is_issued_at_full_value_by_one_entry() -> None:
    books = Books()
    lot = books.issue("12.5", days=30)
    assert (lot.credits, lot.remaining, lot.consumed) == (Decimal("12.5"), Decimal("12.5"), 0)
    assert lot.expires_at == T0 + timedelta(days=30)
    [entry] = books.entries
    assert (entry.kind, entry.amount, entry.lot_id) == (EntryKind.LOT_ISSUED, Decimal("12.5"), lot.lot_id)
    assert books.account.balance == Decimal("12.5") and books.account.debt == 0


def test_only_purchases_settle_orders_and_lots_expire_after_issue() -> None:
    account = _account()
    with pytest.raises(ValueError, match="PURCHASE"):
        domain.issue_lot(
            account, source=LotSource.PURCHASE, credits=Decimal(1), expires_at=None, reference="r", now=T0
        )
    with pytest.raises(RuleViolation):
        domain.issue_lot(
            account, source=LotSource.GRANT, credits=Decimal(1), expires_at=T0, reference="r", now=T0
        )
    with pytest.raises(RuleViolation):
        domain.issue_lot(
            account,
            source=LotSource.GRANT,
            credits=Decimal("0.0000001"),
            expires_at=None,
            reference="r",
            now=T0,
        )


# --- debits and debt ------------------------------------------------------------------------


def test_a_debit_takes_fifo_writing_one_entry_per_lot_with_the_operation_context() -> None:
    books = Books()
    first = books.issue("1", days=5)
    second = books.issue("10")
    posting = books.debit("1500")  # 3 credits
    assert [(e.lot_id, e.amount) for e in posting.entries] == [
        (first.lot_id, Decimal(-1)),
        (second.lot_id, Decimal(-2)),
    ]
    for entry in posting.entries:
        assert entry.kind is EntryKind.DEBIT
        assert entry.operation is not None
        assert (entry.operation.operation_code, entry.operation.operation_version) == ("llm.tokens", 3)
        assert (entry.operation.resource_amount, entry.operation.resource_unit) == (Decimal(1500), "token")
        assert entry.operation.workflow_id == "wf-1"
        assert entry.reference == domain.operation_reference(entry.operation.operation_id)
    assert books.lots[first.lot_id].consumed == 1 and books.lots[second.lot_id].remaining == 8
    assert books.account.balance == 8


def test_a_debit_beyond_the_lots_leaves_debt_written_without_a_lot() -> None:
    books = Books()
    lot = books.issue("2")
    posting = books.debit("2500")  # 5 credits
    assert [(e.lot_id, e.amount) for e in posting.entries] == [(lot.lot_id, Decimal(-2)), (None, Decimal(-3))]
    assert (books.account.balance, books.account.debt) == (Decimal(-3), Decimal(3))
    assert posting.went_negative


def test_a_lot_issued_in_debt_settles_it_with_a_balanced_pair() -> None:
    books = Books()
    books.debit("2500")  # debt 5
    lot = books.issue("8")
    issue, on_lot, on_debt = books.entries[-3:]
    assert (issue.kind, issue.amount, issue.lot_id) == (EntryKind.LOT_ISSUED, Decimal(8), lot.lot_id)
    assert (on_lot.kind, on_lot.amount, on_lot.lot_id) == (EntryKind.DEBT_SETTLEMENT, Decimal(-5), lot.lot_id)
    assert (on_debt.kind, on_debt.amount, on_debt.lot_id) == (EntryKind.DEBT_SETTLEMENT, Decimal(5), None)
    assert on_lot.reference == on_debt.reference == domain.settlement_reference(lot.lot_id)
    assert (lot.credits, lot.remaining, lot.consumed) == (Decimal(8), Decimal(3), Decimal(5))
    assert (books.account.balance, books.account.debt) == (Decimal(3), Decimal(0))
    assert books.account.balance == domain.sum_entries(books.entries)


def test_a_lot_smaller_than_the_debt_settles_what_it_can() -> None:
    books = Books()
    books.debit("5000")  # debt 10
    posting = domain.issue_lot(
        books.account,
        source=LotSource.PROMOTION,
        credits=Decimal(4),
        expires_at=None,
        reference="grant:p",
        now=T0,
        new_id=books.new_id,
    )
    books.apply(posting)
    assert posting.debt_settled == 4
    assert posting.issued_lot is not None and posting.issued_lot.remaining == 0
    assert (books.account.balance, books.account.debt) == (Decimal(-6), Decimal(6))


# --- refunds, chargebacks, expiry, adjustments ----------------------------------------------


def _purchase(books: Books, credits: str = "10", order_id: str = "ord-1") -> Lot:
    return books.issue(credits, days=30, source=LotSource.PURCHASE, order_id=order_id)


def test_a_refund_revokes_the_credits_left_once() -> None:
    books = Books()
    lot = _purchase(books)
    books.debit("2000")  # 4 credits
    refund = domain.apply_refund(
        books.account, books.lots[lot.lot_id], refund="re-1", now=T0, new_id=books.new_id
    )
    books.apply(refund.posting)
    assert refund.credits_revoked == 6
    [entry] = refund.posting.entries
    assert (entry.kind, entry.amount, entry.revoked_lot_id) == (
        EntryKind.REFUND_REVOCATION,
        Decimal(-6),
        lot.lot_id,
    )
    assert refund.lot.reversal is Reversal.REFUNDED and refund.lot.remaining == 0 and refund.lot.consumed == 4
    again = domain.apply_refund(books.account, refund.lot, refund="re-2", now=T0, new_id=books.new_id)
    assert again.credits_revoked == 0 and again.posting.entries == () and again.lot == refund.lot


def test_a_chargeback_revokes_the_full_value_from_the_lot_then_other_lots_then_as_debt() -> None:
    books = Books()
    bought = _purchase(books, "10")
    other = books.issue("3")
    books.debit("4000")  # 8 credits from the purchase (it expires first)
    chargeback = domain.apply_chargeback(
        books.account,
        books.lots[bought.lot_id],
        books.lots.values(),
        chargeback="cb-1",
        now=T0,
        new_id=books.new_id,
    )
    books.apply(chargeback.posting)
    assert chargeback.credits_revoked == 10
    assert [(e.lot_id, e.amount) for e in chargeback.posting.entries] == [
        (bought.lot_id, Decimal(-2)),
        (other.lot_id, Decimal(-3)),
        (None, Decimal(-5)),
    ]
    assert all(e.kind is EntryKind.CHARGEBACK_REVOCATION for e in chargeback.posting.entries)
    assert all(e.revoked_lot_id == bought.lot_id for e in chargeback.posting.entries)
    assert (books.account.balance, books.account.debt) == (Decimal(-5), Decimal(5))
    assert books.lots[other.lot_id].consumed == 3  # it paid back consumption
    assert chargeback.lot.reversal is Reversal.CHARGED_BACK and chargeback.lot.consumed == 8
    with pytest.raises(FailedPrecondition) as twice:
        domain.apply_chargeback(books.account, chargeback.lot, books.lots.values(), chargeback="cb-2", now=T0)
    assert twice.value.reason == "ORDER_ALREADY_CHARGED_BACK"
    with pytest.raises(FailedPrecondition) as refund:
        domain.apply_refund(books.account, chargeback.lot, refund="re-1", now=T0)
    assert refund.value.reason == "ORDER_CHARGED_BACK"


def test_a_chargeback_after_a_refund_takes_back_what_was_consumed() -> None:
    books = Books()
    lot = _purchase(books)
    books.issue("20")
    books.debit("1000")  # 2 credits from the purchase
    refund = domain.apply_refund(
        books.account, books.lots[lot.lot_id], refund="re-1", now=T0, new_id=books.new_id
    )
    books.apply(refund.posting)
    chargeback = domain.apply_chargeback(
        books.account, refund.lot, books.lots.values(), chargeback="cb-1", now=T0, new_id=books.new_id
    )
    books.apply(chargeback.posting)
    assert chargeback.credits_revoked == 2
    assert books.account.balance == 18 and books.account.debt == 0


def test_only_purchase_lots_are_reversed() -> None:
    books = Books()
    lot = books.issue("5")
    with pytest.raises(ValueError, match="purchase"):
        domain.apply_refund(books.account, lot, refund="re-1", now=T0)


def test_expiry_writes_off_the_credits_left_after_the_expiry_only() -> None:
    books = Books()
    lot = books.issue("5", days=1)
    books.debit("1000")  # 2 credits
    with pytest.raises(FailedPrecondition) as early:
        domain.expire_lot(books.account, books.lots[lot.lot_id], now=T0 + timedelta(hours=23))
    assert early.value.reason == "LOT_NOT_EXPIRED"
    at = T0 + timedelta(days=1)
    posting = books.apply(
        domain.expire_lot(books.account, books.lots[lot.lot_id], now=at, new_id=books.new_id)
    )
    [entry] = posting.entries
    assert (entry.kind, entry.amount, entry.occurred_at) == (EntryKind.EXPIRY, Decimal(-3), at)
    expired = books.lots[lot.lot_id]
    assert (expired.remaining, expired.consumed) == (0, 2)
    assert domain.expire_lot(books.account, expired, now=at).entries == ()


def test_adjustments_issue_a_never_expiring_lot_or_take_fifo() -> None:
    books = Books()
    books.issue("2")
    negative = books.apply(
        domain.apply_adjustment(
            books.account,
            books.lots.values(),
            amount=Decimal(-5),
            reason="duplicate grant",
            actor="ops@acme",
            request_id="adj-1",
            now=T0,
            new_id=books.new_id,
        )
    )
    assert [(e.kind, e.amount) for e in negative.entries] == [
        (EntryKind.ADJUSTMENT, Decimal(-2)),
        (EntryKind.ADJUSTMENT, Decimal(-3)),
    ]
    assert all((e.reason, e.actor) == ("duplicate grant", "ops@acme") for e in negative.entries)
    positive = books.apply(
        domain.apply_adjustment(
            books.account,
            books.lots.values(),
            amount=Decimal(4),
            reason="goodwill",
            actor="ops@acme",
            request_id="adj-2",
            now=T0,
            new_id=books.new_id,
        )
    )
    assert positive.issued_lot is not None
    assert (positive.issued_lot.source, positive.issued_lot.expires_at) == (LotSource.ADJUSTMENT, None)
    assert [e.kind for e in positive.entries] == [EntryKind.ADJUSTMENT, *[EntryKind.DEBT_SETTLEMENT] * 2]
    assert (books.account.balance, books.account.debt) == (Decimal(1), Decimal(0))
    with pytest.raises(RuleViolation):
        domain.apply_adjustment(
            books.account, (), amount=Decimal(0), reason="r", actor="a", request_id="adj-3", now=T0
        )


# --- operations -----------------------------------------------------------------------------


def _operation(**changes: object) -> Operation:
    operation = domain.open_operation(_account(), None, RATE, operation_id=uuid4(), workflow_id=None, now=T0)
    return dataclasses.replace(operation, **changes)


def test_an_operation_opens_only_at_a_balance_of_zero_or_more_and_alone() -> None:
    opened = domain.open_operation(_account(), None, RATE, operation_id=uuid4(), workflow_id="wf", now=T0)
    assert (opened.state, opened.rate, opened.workflow_id) == (OperationState.OPEN, RATE, "wf")
    with pytest.raises(FailedPrecondition) as negative:
        domain.open_operation(
            _account(balance=Decimal("-0.000001"), debt=Decimal("0.000001")),
            None,
            RATE,
            operation_id=uuid4(),
            workflow_id=None,
            now=T0,
        )
    assert negative.value.reason == "NEGATIVE_BALANCE"
    # Credits past their expiry, not yet written off, do not hide a debt.
    books = Books()
    books.issue("5", days=1)
    books.debit("1000", at=T0 + timedelta(days=1))  # 2 credits, none usable
    assert books.account.balance == 3 and books.account.debt == 2
    with pytest.raises(FailedPrecondition) as owing:
        domain.open_operation(books.account, None, RATE, operation_id=uuid4(), workflow_id=None, now=T0)
    assert owing.value.reason == "NEGATIVE_BALANCE"
    with pytest.raises(FailedPrecondition) as busy:
        domain.open_operation(_account(), opened, RATE, operation_id=uuid4(), workflow_id=None, now=T0)
    assert busy.value.reason == "OPERATION_ALREADY_OPEN"
    assert busy.value.metadata == {"operation_id": str(opened.operation_id)}


def test_recording_closes_at_the_pinned_rate_and_only_once() -> None:
    operation = _operation()
    closing = domain.record_and_close(operation, _account(), (), Decimal(10), now=T0 + timedelta(minutes=1))
    closed = closing.operation
    assert (closed.state, closed.credits, closed.resource_amount) == (
        OperationState.CLOSED,
        Decimal("0.02"),
        10,
    )
    assert closed.closed_at == T0 + timedelta(minutes=1)
    assert closing.posting.account.debt == Decimal("0.02")
    for settled in (closed, domain.cancel_operation(operation, T0)):
        with pytest.raises(FailedPrecondition) as refused:
            domain.record_and_close(settled, _account(), (), Decimal(1), now=T0)
        assert refused.value.reason == "OPERATION_NOT_OPEN"


def test_recording_nothing_closes_without_entries() -> None:
    closing = domain.record_and_close(_operation(), _account(), (), Decimal(0), now=T0)
    assert closing.operation.credits == 0 and closing.posting.entries == ()


def test_operations_time_out_only_when_open_past_the_timeout() -> None:
    operation = _operation()
    timeout = timedelta(minutes=15)
    assert domain.time_out_operation(operation, timeout, T0 + timedelta(minutes=14)) is None
    timed_out = domain.time_out_operation(operation, timeout, T0 + timeout)
    assert timed_out is not None and timed_out.state is OperationState.TIMED_OUT
    assert domain.time_out_operation(timed_out, timeout, T0 + timedelta(hours=1)) is None
    canceled = domain.cancel_operation(operation, T0)
    assert canceled.state is OperationState.CANCELED
    assert domain.time_out_operation(canceled, timeout, T0 + timedelta(hours=1)) is None


# --- idempotency checks and refunds' money ---------------------------------------------------


def _order(**changes: object) -> PurchaseOrder:
    order = PurchaseOrder("ord-1", USER, UUID(int=7), Money(1999, "EUR"), "psp-1", None)
    return dataclasses.replace(order, **changes)


def test_a_repeat_settlement_must_describe_the_same_payment() -> None:
    domain.ensure_same_purchase(_order(), _order(payment_id="pay-1"))
    with pytest.raises(AlreadyExists) as refused:
        domain.ensure_same_purchase(_order(), _order(amount_paid=Money(999, "EUR"), user_id="other"))
    assert refused.value.reason == "ORDER_ALREADY_SETTLED"
    assert "user_id, amount_paid" in refused.value.message


def test_a_repeat_grant_key_must_ask_for_the_same_grant() -> None:
    product_grant = domain.GrantSpec(USER, LotSource.GRANT, UUID(int=1), Decimal(5), T0)
    domain.ensure_same_grant(
        "k", product_grant, dataclasses.replace(product_grant, expires_at=T0 + timedelta(1))
    )
    custom = domain.GrantSpec(USER, LotSource.CASHBACK, None, Decimal(5), T0)
    with pytest.raises(AlreadyExists) as refused:
        domain.ensure_same_grant("k", custom, dataclasses.replace(custom, expires_at=None))
    assert refused.value.reason == "GRANT_KEY_REUSED"


def test_refunds_never_exceed_the_payment() -> None:
    assert domain.check_refund_amount(_order(), 999, Money(1000, "EUR")) == 1999
    with pytest.raises(FailedPrecondition) as exceeded:
        domain.check_refund_amount(_order(), 1000, Money(1000, "EUR"))
    assert exceeded.value.reason == "REFUND_EXCEEDS_PAYMENT"
    for bad in (Money(0, "EUR"), Money(1, "USD")):
        with pytest.raises(InvalidArgument):
            domain.check_refund_amount(_order(), 0, bad)


# --- balances -------------------------------------------------------------------------------


def test_a_balance_splits_purchased_and_granted_and_names_the_next_expiry() -> None:
    books = Books()
    _purchase(books, "10")  # expires day 30
    books.issue("4", days=7)
    books.issue("1", days=7)
    books.issue("2")
    stale = books.issue("3", days=1)
    at = T0 + timedelta(days=2)
    summary = domain.summarize_balance(books.lots.values(), Decimal(0), at)
    assert (summary.purchased, summary.granted, summary.awaiting_expiry) == (
        Decimal(10),
        Decimal(7),
        Decimal(3),
    )
    assert summary.balance == books.account.balance == 20
    assert (summary.next_expiry, summary.next_expiring_credits) == (T0 + timedelta(days=7), Decimal(5))
    assert [lot.credits for lot in summary.lots] == [Decimal(4), Decimal(1), Decimal(10), Decimal(2)]
    assert stale not in summary.lots


def test_a_balance_in_debt_is_negative() -> None:
    summary = domain.summarize_balance((), Decimal(3), T0)
    assert (summary.balance, summary.debt, summary.next_expiry) == (Decimal(-3), Decimal(3), None)
