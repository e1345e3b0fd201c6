"""The ledger's invariants after any sequence of purchases, grants, operations, adjustments,
refunds, chargebacks, expiries and the passing of time (hypothesis).

After every step: the balance is the sum of the entries (also as of any past instant); each
lot's remaining is the sum of its entries, within [0, credits]; the debt is minus the sum of
the entries without a lot; no credit is both consumed and expired (or revoked); debits take
FIFO; debt is settled exactly by the next lot; operations open only at a balance >= 0.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st
from tally_kit.errors import FailedPrecondition
from tally_ledger import domain
from tally_ledger.domain import Entry, EntryKind, Lot, LotSource, OperationRate, Posting, Reversal

T0 = datetime(2030, 1, 1, tzinfo=UTC)
ZERO = Decimal(0)
RATE = OperationRate("llm.tokens", 1, "token", Decimal("0.000003"))


def _credits(low: int, high: int) -> st.SearchStrategy[Decimal]:
    return st.integers(low, high).map(lambda n: Decimal(n).scaleb(-6))


# Few expiries and whole-day steps, so lots often tie on expiry and differ by issue time.
_expiry_days = st.sampled_from([None, None, 1, 2, 3])
ACTIONS = st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([1, 5, 24, 48])),
    st.tuples(st.just("purchase"), _credits(1, 20_000_000), _expiry_days),
    st.tuples(
        st.just("grant"),
        st.sampled_from(sorted(domain.GRANTABLE_SOURCES, key=lambda s: s.value)),
        _credits(1, 20_000_000),
        _expiry_days,
    ),
    # Resource amounts whose cost at RATE spans ties, sub-millionth usage and large debits.
    st.tuples(st.just("operation"), _credits(0, 6_000_000_000_000)),
    st.tuples(st.just("adjust"), _credits(-15_000_000, 15_000_000).filter(bool)),
    st.tuples(st.just("refund"), st.integers(0, 7)),
    st.tuples(st.just("chargeback"), st.integers(0, 7)),
    st.tuples(st.just("expire")),
)


class Ledger:
    """One account driven through the domain, checked after every posting."""

    def __init__(self) -> None:
        self.now = T0
        self.account = domain.new_account("acme", "user-1", T0)
        self.lots: dict[UUID, Lot] = {}
        self.entries: list[Entry] = []
        self.purchases: list[UUID] = []
        self.balance_at: dict[datetime, Decimal] = {}
        self._ids = (UUID(int=n) for n in itertools.count(1))

    def new_id(self) -> UUID:
        return next(self._ids)

    def apply(self, posting: Posting) -> None:
        assert posting.account_before == self.account
        before = dict(self.lots)
        assert all(entry.occurred_at == self.now for entry in posting.entries)
        self.account = posting.account
        self.lots.update((lot.lot_id, lot) for lot in posting.lots)
        self.entries.extend(posting.entries)
        self._check_fifo(posting, before)
        self._check_settlement(posting)
        self._check_books()
        self.balance_at[self.now] = self.account.balance

    def run(self, action: tuple[object, ...]) -> None:
        match action:
            case ("advance", int(hours)):
                self.now += timedelta(hours=hours)
            case ("purchase", Decimal() as credits, days):
                order_id = f"ord-{len(self.purchases)}"
                posting = self._issue(LotSource.PURCHASE, credits, days, order_id)
                assert posting.issued_lot is not None
                self.purchases.append(posting.issued_lot.lot_id)
            case ("grant", LotSource() as source, Decimal() as credits, days):
                self._issue(source, credits, days, None)
            case ("operation", Decimal() as resource):
                self._operate(resource)
            case ("adjust", Decimal() as amount):
                posting = domain.apply_adjustment(
                    self.account,
                    self.lots.values(),
                    amount=amount,
                    reason="correction",
                    actor="ops",
                    request_id=f"adj-{len(self.entries)}",
                    now=self.now,
                    new_id=self.new_id,
                )
                self.apply(posting)
            case ("refund", int(index)) if self.purchases:
                self._refund(self.lots[self.purchases[index % len(self.purchases)]])
            case ("chargeback", int(index)) if self.purchases:
                self._chargeback(self.lots[self.purchases[index % len(self.purchases)]])
            case ("expire",):
                for lot in domain.lots_past_expiry(self.lots.values(), self.now):
                    self.apply(domain.expire_lot(self.account, lot, now=self.now, new_id=self.new_id))
        self._check_time()

    def _issue(self, source: LotSource, credits: Decimal, days: int | None, order_id: str | None) -> Posting:
        posting = domain.issue_lot(
            self.account,
            source=source,
            credits=credits,
            expires_at=domain.lot_expiry(self.now, days),
            reference=f"ref-{len(self.entries)}",
            now=self.now,
            order_id=order_id,
            new_id=self.new_id,
        )
        self.apply(posting)
        return posting

    def _operate(self, resource: Decimal) -> None:
        try:
            operation = domain.open_operation(
                self.account, None, RATE, operation_id=self.new_id(), workflow_id=None, now=self.now
            )
        except FailedPrecondition as refused:
            assert refused.reason == "NEGATIVE_BALANCE" and self.account.debt > 0
            return
        assert self.account.balance >= 0 and self.account.debt == 0
        closing = domain.record_and_close(
            operation, self.account, self.lots.values(), resource, now=self.now, new_id=self.new_id
        )
        assert closing.operation.credits == domain.credits_for(resource, RATE.credits_per_unit)
        assert -domain.sum_entries(closing.posting.entries) == closing.operation.credits
        self.apply(closing.posting)

    def _refund(self, lot: Lot) -> None:
        try:
            refund = domain.apply_refund(self.account, lot, refund="re", now=self.now, new_id=self.new_id)
        except FailedPrecondition:
            assert lot.reversal is Reversal.CHARGED_BACK
            return
        assert refund.credits_revoked == lot.remaining
        self.apply(refund.posting)
        assert self.lots[lot.lot_id].remaining == 0 and refund.lot.reversal is not None

    def _chargeback(self, lot: Lot) -> None:
        try:
            chargeback = domain.apply_chargeback(
                self.account, lot, self.lots.values(), chargeback="cb", now=self.now, new_id=self.new_id
            )
        except FailedPrecondition:
            assert lot.reversal is Reversal.CHARGED_BACK
            return
        # The full value: whatever did not expire, and was not already revoked by a refund.
        assert chargeback.credits_revoked == lot.remaining + lot.consumed
        assert -domain.sum_entries(chargeback.posting.entries) == chargeback.credits_revoked
        self.apply(chargeback.posting)
        assert self.lots[lot.lot_id].reversal is Reversal.CHARGED_BACK

    # --- checks -----------------------------------------------------------------------------

    def _check_books(self) -> None:
        by_lot: dict[UUID, list[Entry]] = defaultdict(list)
        for entry in self.entries:
            assert entry.amount != 0
            if entry.lot_id is not None:
                by_lot[entry.lot_id].append(entry)
        assert self.account.balance == domain.sum_entries(self.entries)
        assert self.account.debt == -domain.sum_entries([e for e in self.entries if e.lot_id is None]) >= 0
        assert (
            self.account.balance
            == sum((lot.remaining for lot in self.lots.values()), ZERO) - self.account.debt
        )
        for lot in self.lots.values():
            entries = by_lot[lot.lot_id]
            opening, *rest = entries
            assert opening.amount == lot.credits and all(e.amount < 0 for e in rest)
            assert lot.remaining == domain.sum_entries(entries)
            assert 0 <= lot.remaining <= lot.credits
            consumed = -domain.sum_entries([e for e in entries if domain.consumes(e)])
            expired = -domain.sum_entries([e for e in entries if e.kind is EntryKind.EXPIRY])
            revoked = -domain.sum_entries([e for e in entries if e.revoked_lot_id == lot.lot_id])
            assert lot.consumed == consumed
            # Every credit that left the lot left it one way only.
            assert min(consumed, expired, revoked) >= 0
            assert lot.credits == lot.remaining + consumed + expired + revoked
            for entry in entries:
                if domain.consumes(entry):
                    assert lot.expires_at is None or entry.occurred_at < lot.expires_at
                if entry.kind is EntryKind.EXPIRY:
                    assert lot.expires_at is not None and entry.occurred_at >= lot.expires_at

    def _check_time(self) -> None:
        # While in debt, no usable lot holds credits: a debit or chargeback emptied them first,
        # and a new lot settles the debt before anything else.
        if self.account.debt > 0:
            assert not [lot for lot in self.lots.values() if lot.usable_at(self.now)]
        summary = domain.summarize_balance(self.lots.values(), self.account.debt, self.now)
        assert summary.balance == self.account.balance

    def _check_fifo(self, posting: Posting, before: dict[UUID, Lot]) -> None:
        """A lot is taken from only once every usable lot ahead of it in FIFO order is empty,
        and nothing is left uncovered while a usable lot holds credits."""
        takes = [e for e in posting.entries if _takes(e)]
        if not takes:
            return
        usable = sorted((lot for lot in before.values() if lot.usable_at(self.now)), key=_fifo_order)
        taken = {e.lot_id for e in takes if e.lot_id is not None}
        uncovered = any(e.lot_id is None for e in takes)
        for position, lot in enumerate(usable):
            behind = {later.lot_id for later in usable[position + 1 :]}
            if uncovered or taken & behind:
                assert self.lots[lot.lot_id].remaining == 0, "a lot ahead in FIFO order was skipped"

    def _check_settlement(self, posting: Posting) -> None:
        pairs: dict[str, list[Entry]] = defaultdict(list)
        for entry in posting.entries:
            if entry.kind is EntryKind.DEBT_SETTLEMENT:
                pairs[entry.reference].append(entry)
        issued = posting.issued_lot
        if issued is None:
            assert not pairs
            return
        expected = min(posting.account_before.debt, issued.credits)
        assert posting.debt_settled == expected
        assert posting.account.debt == posting.account_before.debt - expected
        if expected:
            [pair] = pairs.values()
            on_lot, on_debt = sorted(pair, key=lambda e: e.amount)
            assert (on_lot.lot_id, on_lot.amount) == (issued.lot_id, -expected)
            assert (on_debt.lot_id, on_debt.amount) == (None, expected)
            assert on_lot.reference == domain.settlement_reference(issued.lot_id)

    def check_history(self) -> None:
        """GetBalance as of any past instant equals the sum of the history up to it."""
        for instant, balance in self.balance_at.items():
            assert domain.sum_entries([e for e in self.entries if e.occurred_at <= instant]) == balance


def _fifo_order(lot: Lot) -> tuple[datetime, datetime, UUID]:
    """Rule 4, stated independently of the domain: soonest expiry first, never-expiring last,
    ties by issue time (then id, to make the order total)."""
    return (lot.expires_at or datetime.max.replace(tzinfo=UTC), lot.issued_at, lot.lot_id)


def _takes(entry: Entry) -> bool:
    """Entries a FIFO take writes: debits, negative adjustments and chargeback paybacks."""
    if entry.kind in (EntryKind.DEBIT, EntryKind.ADJUSTMENT):
        return entry.amount < 0
    return entry.kind is EntryKind.CHARGEBACK_REVOCATION and entry.lot_id != entry.revoked_lot_id


@settings(max_examples=200, deadline=None)
@given(st.lists(ACTIONS, min_size=3, max_size=30))
def test_the_books_stay_exact_under_any_sequence(actions: Iterable[tuple[object, ...]]) -> None:
    ledger = Ledger()
    for action in actions:
        ledger.run(action)
    ledger.check_history()


_instants = st.sampled_from([T0 + timedelta(days=d) for d in range(4)])


@st.composite
def _lots(draw: st.DrawFn) -> list[Lot]:
    lots = []
    for n in range(draw(st.integers(0, 6))):
        issued_at = draw(_instants)
        expires_at = draw(st.none() | _instants.map(lambda i: i + timedelta(days=1)))
        credits = draw(_credits(1, 9_000_000))
        remaining = draw(st.integers(0, int(credits.scaleb(6))))
        lots.append(
            Lot(
                # Random, so ties on expiry and issue fall to the id in any order; unique by n.
                lot_id=UUID(int=draw(st.integers(0, 2**32)) * 8 + n),
                merchant_id="acme",
                user_id="user-1",
                source=LotSource.GRANT,
                credits=credits,
                remaining=Decimal(remaining).scaleb(-6),
                consumed=ZERO,
                issued_at=issued_at,
                expires_at=expires_at,
                reference="r",
            )
        )
    return lots


@settings(max_examples=300, deadline=None)
@given(_lots(), _credits(0, 40_000_000), _instants)
def test_a_fifo_plan_empties_usable_lots_in_fifo_order(
    lots: list[Lot], amount: Decimal, now: datetime
) -> None:
    plan = domain.plan_fifo(lots, amount, now)
    expected: list[tuple[UUID, Decimal]] = []
    left = amount
    for lot in sorted(
        (lot for lot in lots if lot.remaining > 0 and not lot.expired_at(now)), key=_fifo_order
    ):
        if left == 0:
            break
        expected.append((lot.lot_id, min(left, lot.remaining)))
        left -= min(left, lot.remaining)
    assert [(take.lot_id, take.amount) for take in plan.takes] == expected
    assert plan.uncovered == left
