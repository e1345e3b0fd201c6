"""The ledger's rules: accounts, lots, entries, FIFO consumption, debt, reversals, expiry and
two-phase operations.

Pure: no I/O, no clock (callers pass `now`), no protobuf. Ids come from the `new_id` factory
callers pass (uuid4 unless a test wants them predictable). Credits are exact Decimals with
at most 6 fractional digits (`tally_kit.amounts`).

How the books are kept
----------------------
Every change to an account is a `Posting`: the entries to append, in order, and the account
and lots as they are after them. Each entry moves the balance by its signed amount and
either one lot (`lot_id` set) or the debt (`lot_id` None). Hence, at every instant:

- balance         = sum of the user's entries;
- lot.remaining   = sum of the entries on the lot (its opening entry is +credits);
- debt            = minus the sum of the entries without a lot;
- balance         = sum of lot.remaining - debt.

A debit takes from the usable lots FIFO and writes one entry per lot it takes from; what
they cannot cover is written without a lot and becomes debt. A lot is always issued at full
value; when the user is in debt the lot's opening entry is followed by a balanced pair of
DEBT_SETTLEMENT entries sharing the reference `settlement:<lot id>`: minus the settled
amount on the new lot (consuming it) and plus the same amount without a lot (clearing that
much debt). The pair sums to zero, so the balance is exactly what the opening entry made it,
the lot's remaining is credits minus what it settled, and the debt shrinks by as much.

Each lot also keeps `consumed`: what the user has had the use of from it (debits, debt
settled, negative adjustments, and credits taken to pay back another lot's chargeback).
What leaves a lot is consumed, expired, or revoked by the lot's own refund or chargeback,
never two of these: credits = remaining + consumed + expired + revoked.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, Inexact, localcontext
from typing import Any
from uuid import UUID, uuid4

from tally_kit.amounts import CREDITS_FRACTION_DIGITS, MAX_CREDITS, Money, parse_decimal
from tally_kit.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, RuleViolation

IdFactory = Callable[[], UUID]

# The smallest amount of credits: one millionth.
CREDIT_QUANTUM = Decimal(1).scaleb(-CREDITS_FRACTION_DIGITS)
ZERO = Decimal(0)

# Identifiers chosen by merchants' applications. User ids appear in URLs, hence no `/`.
USER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
# Order ids, workflow ids: printable ASCII without whitespace.
EXTERNAL_ID_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")
GRANT_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,200}")
# Grant keys of sign-up grants are the ledger's own; callers may not choose one like them.
SIGNUP_GRANT_KEY_PREFIX = "signup:"
# Provider, refund and chargeback references; adjustments' reasons and actors.
MAX_REFERENCE_LENGTH = 200
MAX_REASON_LENGTH = 500
MAX_ACTOR_LENGTH = 200


class LotSource(enum.Enum):
    PURCHASE = "purchase"
    GRANT = "grant"
    CASHBACK = "cashback"
    SUBSCRIPTION = "subscription"
    PROMOTION = "promotion"
    ADJUSTMENT = "adjustment"


# The sources `GrantCredits` may name; purchases and adjustments have their own commands.
GRANTABLE_SOURCES = frozenset(
    {LotSource.GRANT, LotSource.CASHBACK, LotSource.SUBSCRIPTION, LotSource.PROMOTION}
)


class Reversal(enum.Enum):
    """What became of a purchase lot's payment."""

    REFUNDED = "refunded"
    CHARGED_BACK = "charged_back"


class LotState(enum.Enum):
    ACTIVE = "active"
    DEPLETED = "depleted"
    EXPIRED = "expired"
    REFUNDED = "refunded"
    CHARGED_BACK = "charged_back"


class EntryKind(enum.Enum):
    LOT_ISSUED = "lot_issued"
    DEBIT = "debit"
    DEBT_SETTLEMENT = "debt_settlement"
    REFUND_REVOCATION = "refund_revocation"
    CHARGEBACK_REVOCATION = "chargeback_revocation"
    EXPIRY = "expiry"
    ADJUSTMENT = "adjustment"


class OperationState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"
    CANCELED = "canceled"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class Account:
    merchant_id: str
    user_id: str
    balance: Decimal
    # 0 or more: what the user owes beyond every credit their lots held.
    debt: Decimal
    registered_at: datetime


@dataclass(frozen=True)
class Lot:
    lot_id: UUID
    merchant_id: str
    user_id: str
    source: LotSource
    credits: Decimal
    remaining: Decimal
    # What the user has had the use of: see the module's docstring.
    consumed: Decimal
    issued_at: datetime
    # None: never expires.
    expires_at: datetime | None
    # What the lot was issued for: `order:<id>`, `grant:<key>` or `adjustment:<request id>`.
    reference: str
    product_id: UUID | None = None
    # Set for PURCHASE lots only.
    order_id: str | None = None
    reversal: Reversal | None = None
    reversed_at: datetime | None = None

    def expired_at(self, instant: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= instant

    def usable_at(self, instant: datetime) -> bool:
        """Whether a debit at `instant` may take from the lot: credits left and not expired."""
        return self.remaining > 0 and not self.expired_at(instant)


@dataclass(frozen=True)
class OperationContext:
    """The operation a DEBIT entry belongs to, copied into every one of its entries."""

    operation_id: UUID
    operation_code: str
    operation_version: int
    resource_amount: Decimal
    resource_unit: str
    credits_per_unit: Decimal
    workflow_id: str | None


@dataclass(frozen=True)
class Entry:
    entry_id: UUID
    merchant_id: str
    user_id: str
    kind: EntryKind
    # Signed, never zero.
    amount: Decimal
    # None: the entry moves the debt instead of a lot.
    lot_id: UUID | None
    occurred_at: datetime
    # What caused it: see the `*_reference` functions.
    reference: str
    operation: OperationContext | None = None
    # The purchase lot being revoked, on REFUND_REVOCATION and CHARGEBACK_REVOCATION entries.
    revoked_lot_id: UUID | None = None
    reason: str | None = None
    actor: str | None = None


@dataclass(frozen=True)
class Posting:
    """One change of an account: entries to append in order, and the state they lead to."""

    account_before: Account
    account: Account
    entries: tuple[Entry, ...]
    # Every lot issued or changed, in its new state, in the order first touched.
    lots: tuple[Lot, ...]
    # The lot this posting opened, if any (its row exists before its entries).
    issued_lot: Lot | None = None

    @property
    def went_negative(self) -> bool:
        """Whether it took the balance from 0 or more to below 0 (`ledger.balance_went_negative`)."""
        return self.account_before.balance >= 0 > self.account.balance

    @property
    def debt_settled(self) -> Decimal:
        return sum(
            (e.amount for e in self.entries if e.kind is EntryKind.DEBT_SETTLEMENT and e.lot_id is None),
            ZERO,
        )


@dataclass(frozen=True)
class OperationRate:
    """The operation-type version an operation pins when it opens."""

    operation_code: str
    version: int
    resource_unit: str
    credits_per_unit: Decimal


@dataclass(frozen=True)
class Operation:
    operation_id: UUID
    merchant_id: str
    user_id: str
    rate: OperationRate
    workflow_id: str | None
    state: OperationState
    opened_at: datetime
    closed_at: datetime | None = None
    # Set once CLOSED.
    resource_amount: Decimal | None = None
    credits: Decimal | None = None


@dataclass(frozen=True)
class OperationClosing:
    operation: Operation
    posting: Posting


@dataclass(frozen=True)
class PurchaseOrder:
    """A paid order as reported for settlement."""

    order_id: str
    user_id: str
    product_id: UUID
    amount_paid: Money
    provider_reference: str
    # Tally's payment id when paid through the payment gateway.
    payment_id: str | None


@dataclass(frozen=True)
class GrantSpec:
    """What a grant asks for, to tell a repeat of a grant key from a reuse of it."""

    user_id: str
    source: LotSource
    # None for custom credits.
    product_id: UUID | None
    credits: Decimal
    # Compared for custom credits only: a product's lots expire relative to their issue.
    expires_at: datetime | None


@dataclass(frozen=True)
class Revocation:
    """A refund or chargeback applied to a purchase lot."""

    posting: Posting
    lot: Lot
    credits_revoked: Decimal


@dataclass(frozen=True)
class LotTake:
    lot_id: UUID
    amount: Decimal


@dataclass(frozen=True)
class FifoPlan:
    takes: tuple[LotTake, ...]
    # What the lots could not cover: debt.
    uncovered: Decimal


@dataclass(frozen=True)
class BalanceSummary:
    balance: Decimal
    debt: Decimal
    # Credits left in usable PURCHASE lots.
    purchased: Decimal
    # Credits left in every other usable lot.
    granted: Decimal
    # Credits left in lots past their expiry that no EXPIRY entry has written off yet.
    awaiting_expiry: Decimal
    next_expiry: datetime | None
    next_expiring_credits: Decimal
    # Usable lots in FIFO order.
    lots: tuple[Lot, ...]


# --- values ---------------------------------------------------------------------------------


def check_pattern(value: str, pattern: re.Pattern[str], description: str) -> str:
    if not pattern.fullmatch(value):
        raise RuleViolation(f"must be {description}")
    return value


def check_user_id(value: str) -> str:
    return check_pattern(
        value, USER_ID_PATTERN, "1 to 128 characters from [A-Za-z0-9._:@+-], starting with a letter or digit"
    )


def check_external_id(value: str) -> str:
    return check_pattern(value, EXTERNAL_ID_PATTERN, "1 to 128 printable ASCII characters without spaces")


def check_grant_key(value: str) -> str:
    check_pattern(value, GRANT_KEY_PATTERN, "1 to 200 printable ASCII characters without spaces")
    if value.startswith(SIGNUP_GRANT_KEY_PREFIX):
        raise RuleViolation(f"must not start with {SIGNUP_GRANT_KEY_PREFIX!r}, kept for sign-up grants")
    return value


def parse_resource_amount(text: str) -> Decimal:
    """A resource amount: 0 or more, at most 6 fractional digits, at most MAX_CREDITS."""
    value = parse_decimal(text, CREDITS_FRACTION_DIGITS)
    if value < 0:
        raise RuleViolation("must be 0 or more")
    if value > MAX_CREDITS:
        raise RuleViolation(f"must be at most {MAX_CREDITS}")
    return value


def _check_credits(credits: Decimal) -> Decimal:
    if credits <= 0 or credits > MAX_CREDITS or credits != credits.quantize(CREDIT_QUANTUM):
        raise RuleViolation(f"credits must be in (0, {MAX_CREDITS}] with at most 6 fractional digits")
    return credits


# --- references -----------------------------------------------------------------------------


def order_reference(order_id: str) -> str:
    return f"order:{order_id}"


def grant_reference(grant_key: str) -> str:
    return f"grant:{grant_key}"


def operation_reference(operation_id: UUID) -> str:
    return f"operation:{operation_id}"


def refund_reference(refund: str) -> str:
    return f"refund:{refund}"


def chargeback_reference(chargeback: str) -> str:
    return f"chargeback:{chargeback}"


def adjustment_reference(request_id: str) -> str:
    return f"adjustment:{request_id}"


def expiry_reference(lot_id: UUID) -> str:
    return f"expiry:{lot_id}"


def settlement_reference(lot_id: UUID) -> str:
    """Shared by the two entries of the pair settling debt from a new lot."""
    return f"settlement:{lot_id}"


def signup_grant_key(product_id: UUID, user_id: str) -> str:
    return f"{SIGNUP_GRANT_KEY_PREFIX}{product_id}:{user_id}"


# --- conversion -----------------------------------------------------------------------------


def credits_for(resource_amount: Decimal, credits_per_unit: Decimal) -> Decimal:
    """The credits an operation costs: `resource_amount` units at `credits_per_unit`.

    Rounding rule: the exact product, rounded to 6 fractional digits HALF TO EVEN, except that
    a positive product below half a millionth costs one millionth.

    Why: credits exist in whole millionths, so a product with more digits must be rounded.
    Rounding to the nearest millionth keeps every charge within half a millionth of the
    exact cost; sending exact ties (a 5 in the 7th digit, as when half a unit is used at an
    odd rate such as 0.000003) to the even neighbour sends half of them up and half down, so
    over many operations rounding favours neither the merchant nor the user (HALF UP would add a
    systematic surplus on every tie). The one exception keeps measurable consumption from
    being free: a positive usage is never charged less than the smallest credit, one
    millionth, while no usage (0) costs nothing.
    """
    if resource_amount < 0:
        raise RuleViolation("resource amount must be 0 or more")
    if credits_per_unit <= 0:
        raise RuleViolation("credits per unit must be greater than 0")
    with localcontext() as context:
        # Enough digits for any product of two numeric(20, 6) values, and a trap proving it.
        context.prec = 64
        context.traps[Inexact] = True
        exact = resource_amount * credits_per_unit
        context.traps[Inexact] = False
        charged = exact.quantize(CREDIT_QUANTUM, rounding=ROUND_HALF_EVEN)
    if exact > 0 and charged == 0:
        charged = CREDIT_QUANTUM
    if charged > MAX_CREDITS:
        raise RuleViolation(f"costs {charged} credits, more than the {MAX_CREDITS} a debit may take")
    return charged


# --- lots -----------------------------------------------------------------------------------


def lot_expiry(issued_at: datetime, access_period_days: int | None) -> datetime | None:
    """When a product's lot issued at `issued_at` expires: `access_period_days` later, or never."""
    return None if access_period_days is None else issued_at + timedelta(days=access_period_days)


def fifo_key(lot: Lot) -> tuple[bool, datetime, datetime, UUID]:
    """Consumption order: soonest expiry first, never-expiring last, then issue time, then id.

    The id only makes the order total; it matches PostgreSQL's ordering of uuid values.
    """
    return (lot.expires_at is None, lot.expires_at or lot.issued_at, lot.issued_at, lot.lot_id)


def lot_state(lot: Lot, instant: datetime) -> LotState:
    if lot.reversal is Reversal.CHARGED_BACK:
        return LotState.CHARGED_BACK
    if lot.reversal is Reversal.REFUNDED:
        return LotState.REFUNDED
    if lot.expired_at(instant):
        return LotState.EXPIRED
    return LotState.DEPLETED if lot.remaining == 0 else LotState.ACTIVE


def plan_fifo(lots: Iterable[Lot], amount: Decimal, now: datetime) -> FifoPlan:
    """Which usable lots a debit of `amount` at `now` takes from, how much from each, and what
    is left uncovered. Lots past their expiry are never taken from, even before the expiry
    job has written them off."""
    if amount < 0:
        raise RuleViolation("a debit must be 0 or more")
    takes: list[LotTake] = []
    left = amount
    for lot in sorted((lot for lot in lots if lot.usable_at(now)), key=fifo_key):
        if left == 0:
            break
        take = min(left, lot.remaining)
        takes.append(LotTake(lot.lot_id, take))
        left -= take
    return FifoPlan(tuple(takes), left)


# Negative entries of these kinds on a lot count as consumed; see the module's docstring.
_CONSUMING_KINDS = frozenset({EntryKind.DEBIT, EntryKind.DEBT_SETTLEMENT, EntryKind.ADJUSTMENT})


def consumes(entry: Entry) -> bool:
    """Whether the entry takes credits the user has the use of from its lot."""
    if entry.lot_id is None or entry.amount >= 0:
        return False
    if entry.kind is EntryKind.CHARGEBACK_REVOCATION:
        # Paying back another lot's chargeback; the lot's own revocation is not consumption.
        return entry.revoked_lot_id != entry.lot_id
    return entry.kind in _CONSUMING_KINDS


@dataclass(frozen=True)
class _EntryContext:
    operation: OperationContext | None = None
    revoked_lot_id: UUID | None = None
    reason: str | None = None
    actor: str | None = None


class _Books:
    """A posting being written: applies each entry to the account and its lots at once."""

    def __init__(self, account: Account, lots: Iterable[Lot], now: datetime, new_id: IdFactory) -> None:
        self._before = account
        self._balance = account.balance
        self._debt = account.debt
        self._lots = {lot.lot_id: lot for lot in lots}
        self._touched: dict[UUID, None] = {}
        self._entries: list[Entry] = []
        self._issued: UUID | None = None
        self._now = now
        self._new_id = new_id
        for lot in self._lots.values():
            if (lot.merchant_id, lot.user_id) != (account.merchant_id, account.user_id):
                raise ValueError(f"lot {lot.lot_id} belongs to another account")

    def lot(self, lot_id: UUID) -> Lot:
        return self._lots[lot_id]

    def post(
        self,
        kind: EntryKind,
        amount: Decimal,
        lot_id: UUID | None,
        reference: str,
        context: _EntryContext | None = None,
    ) -> None:
        if amount == 0:
            raise ValueError("entries never carry zero")
        context = context or _EntryContext()
        entry = Entry(
            entry_id=self._new_id(),
            merchant_id=self._before.merchant_id,
            user_id=self._before.user_id,
            kind=kind,
            amount=amount,
            lot_id=lot_id,
            occurred_at=self._now,
            reference=reference,
            operation=context.operation,
            revoked_lot_id=context.revoked_lot_id,
            reason=context.reason,
            actor=context.actor,
        )
        self._entries.append(entry)
        self._balance += amount
        if lot_id is None:
            self._debt -= amount
            if self._debt < 0:
                raise ValueError("an entry without a lot may only settle debt that exists")
            return
        lot = self._lots[lot_id]
        remaining = lot.remaining + amount
        if not 0 <= remaining <= lot.credits:
            raise ValueError(f"lot {lot_id} would hold {remaining} of {lot.credits} credits")
        consumed = lot.consumed - amount if consumes(entry) else lot.consumed
        self.replace(lot, remaining=remaining, consumed=consumed)

    def replace(self, lot: Lot, **changes: Any) -> Lot:
        changed = dataclasses.replace(lot, **changes)
        self._lots[lot.lot_id] = changed
        self._touched[lot.lot_id] = None
        return changed

    def open_lot(self, lot: Lot, kind: EntryKind, context: _EntryContext | None = None) -> None:
        """Issues `lot` at full value, then settles whatever debt it can from it."""
        self._lots[lot.lot_id] = dataclasses.replace(lot, remaining=ZERO, consumed=ZERO)
        self._issued = lot.lot_id
        self.post(kind, lot.credits, lot.lot_id, lot.reference, context)
        settled = min(self._debt, lot.credits)
        if settled > 0:
            reference = settlement_reference(lot.lot_id)
            self.post(EntryKind.DEBT_SETTLEMENT, -settled, lot.lot_id, reference)
            self.post(EntryKind.DEBT_SETTLEMENT, settled, None, reference)

    def take(self, kind: EntryKind, amount: Decimal, reference: str, context: _EntryContext) -> None:
        """Takes `amount` FIFO from the usable lots; what they cannot cover becomes debt."""
        plan = plan_fifo(self._lots.values(), amount, self._now)
        for take in plan.takes:
            self.post(kind, -take.amount, take.lot_id, reference, context)
        if plan.uncovered > 0:
            self.post(kind, -plan.uncovered, None, reference, context)

    def finish(self) -> Posting:
        account = dataclasses.replace(self._before, balance=self._balance, debt=self._debt)
        return Posting(
            account_before=self._before,
            account=account,
            entries=tuple(self._entries),
            lots=tuple(self._lots[lot_id] for lot_id in self._touched),
            issued_lot=None if self._issued is None else self._lots[self._issued],
        )


def new_account(merchant_id: str, user_id: str, now: datetime) -> Account:
    return Account(merchant_id=merchant_id, user_id=user_id, balance=ZERO, debt=ZERO, registered_at=now)


def issue_lot(
    account: Account,
    *,
    source: LotSource,
    credits: Decimal,
    expires_at: datetime | None,
    reference: str,
    now: datetime,
    product_id: UUID | None = None,
    order_id: str | None = None,
    new_id: IdFactory = uuid4,
) -> Posting:
    """Issues a lot at full value (`Posting.issued_lot`); while the user is in debt, the new
    lot settles it first. Adjustments issue their lots through `apply_adjustment`."""
    if source is LotSource.ADJUSTMENT:
        raise ValueError("positive adjustments issue their lots through apply_adjustment")
    if (source is LotSource.PURCHASE) != (order_id is not None):
        raise ValueError("exactly the PURCHASE lots settle an order")
    lot = _new_lot(account, new_id(), source, credits, expires_at, reference, now, product_id, order_id)
    books = _Books(account, (), now, new_id)
    books.open_lot(lot, EntryKind.LOT_ISSUED)
    return books.finish()


def _new_lot(
    account: Account,
    lot_id: UUID,
    source: LotSource,
    credits: Decimal,
    expires_at: datetime | None,
    reference: str,
    now: datetime,
    product_id: UUID | None = None,
    order_id: str | None = None,
) -> Lot:
    _check_credits(credits)
    if expires_at is not None and expires_at <= now:
        raise RuleViolation("a lot must expire after it is issued")
    return Lot(
        lot_id=lot_id,
        merchant_id=account.merchant_id,
        user_id=account.user_id,
        source=source,
        credits=credits,
        remaining=credits,
        consumed=ZERO,
        issued_at=now,
        expires_at=expires_at,
        reference=reference,
        product_id=product_id,
        order_id=order_id,
    )


def ensure_same_purchase(settled: PurchaseOrder, requested: PurchaseOrder) -> None:
    """A repeat settlement of an order must describe the same payment."""
    fields = ("user_id", "product_id", "amount_paid", "provider_reference")
    differing = [f for f in fields if getattr(settled, f) != getattr(requested, f)]
    if differing:
        raise AlreadyExists(
            f"order {settled.order_id} was already settled with another {', '.join(differing)}",
            reason="ORDER_ALREADY_SETTLED",
            metadata={"order_id": settled.order_id},
        )


def ensure_same_grant(grant_key: str, granted: GrantSpec, requested: GrantSpec) -> None:
    """A repeat of a grant key must ask for the same grant."""
    fields = ["user_id", "source", "product_id", "credits"]
    if requested.product_id is None:
        fields.append("expires_at")
    differing = [f for f in fields if getattr(granted, f) != getattr(requested, f)]
    if differing:
        raise AlreadyExists(
            f"grant key {grant_key!r} was already used for another {', '.join(differing)}",
            reason="GRANT_KEY_REUSED",
            metadata={"grant_key": grant_key},
        )


# --- reversals, expiry, adjustments ---------------------------------------------------------


def check_refund_amount(order: PurchaseOrder, refunded_before: int, amount: Money) -> int:
    """The order's refunded total after a refund of `amount`; refunds never exceed the payment."""
    if amount.amount_minor <= 0:
        raise InvalidArgument([FieldViolation("amount_refunded.amount_minor", "must be greater than 0")])
    if amount.currency != order.amount_paid.currency:
        raise InvalidArgument(
            [FieldViolation("amount_refunded.currency", f"must be {order.amount_paid.currency}, as paid")]
        )
    total = refunded_before + amount.amount_minor
    if total > order.amount_paid.amount_minor:
        raise FailedPrecondition(
            f"refunds of order {order.order_id} would total {total}, more than the "
            f"{order.amount_paid.amount_minor} paid",
            reason="REFUND_EXCEEDS_PAYMENT",
            metadata={"order_id": order.order_id},
        )
    return total


def _ensure_purchase_lot(lot: Lot) -> None:
    if lot.source is not LotSource.PURCHASE:
        raise ValueError(f"lot {lot.lot_id} is not a purchase; only purchases are refunded or charged back")


def apply_refund(
    account: Account, lot: Lot, *, refund: str, now: datetime, new_id: IdFactory = uuid4
) -> Revocation:
    """Revokes the credits left in a purchase's lot. Later partial refunds revoke nothing more."""
    _ensure_purchase_lot(lot)
    if lot.reversal is Reversal.CHARGED_BACK:
        raise FailedPrecondition(
            f"order {lot.order_id} was charged back; it can no longer be refunded",
            reason="ORDER_CHARGED_BACK",
            metadata={"order_id": lot.order_id or ""},
        )
    books = _Books(account, (lot,), now, new_id)
    revoked = lot.remaining
    if revoked > 0:
        context = _EntryContext(revoked_lot_id=lot.lot_id)
        books.post(EntryKind.REFUND_REVOCATION, -revoked, lot.lot_id, refund_reference(refund), context)
    if lot.reversal is None:
        books.replace(books.lot(lot.lot_id), reversal=Reversal.REFUNDED, reversed_at=now)
    return Revocation(books.finish(), books.lot(lot.lot_id), revoked)


def apply_chargeback(
    account: Account,
    lot: Lot,
    lots: Iterable[Lot],
    *,
    chargeback: str,
    now: datetime,
    new_id: IdFactory = uuid4,
) -> Revocation:
    """Revokes a purchase lot's full value: the credits left in it, then what was consumed of
    it, taken FIFO from the user's other usable `lots` and, beyond them, as debt."""
    _ensure_purchase_lot(lot)
    if lot.reversal is Reversal.CHARGED_BACK:
        raise FailedPrecondition(
            f"order {lot.order_id} was already charged back",
            reason="ORDER_ALREADY_CHARGED_BACK",
            metadata={"order_id": lot.order_id or ""},
        )
    others = [other for other in lots if other.lot_id != lot.lot_id]
    books = _Books(account, [lot, *others], now, new_id)
    reference = chargeback_reference(chargeback)
    context = _EntryContext(revoked_lot_id=lot.lot_id)
    if lot.remaining > 0:
        books.post(EntryKind.CHARGEBACK_REVOCATION, -lot.remaining, lot.lot_id, reference, context)
    if lot.consumed > 0:
        books.take(EntryKind.CHARGEBACK_REVOCATION, lot.consumed, reference, context)
    books.replace(books.lot(lot.lot_id), reversal=Reversal.CHARGED_BACK, reversed_at=now)
    return Revocation(books.finish(), books.lot(lot.lot_id), lot.remaining + lot.consumed)


def expire_lot(account: Account, lot: Lot, *, now: datetime, new_id: IdFactory = uuid4) -> Posting:
    """Writes off the credits left in a lot past its expiry (no entry when none are left)."""
    if not lot.expired_at(now):
        raise FailedPrecondition(f"lot {lot.lot_id} has not expired", reason="LOT_NOT_EXPIRED")
    books = _Books(account, (lot,), now, new_id)
    if lot.remaining > 0:
        books.post(EntryKind.EXPIRY, -lot.remaining, lot.lot_id, expiry_reference(lot.lot_id))
    return books.finish()


def apply_adjustment(
    account: Account,
    lots: Iterable[Lot],
    *,
    amount: Decimal,
    reason: str,
    actor: str,
    request_id: str,
    now: datetime,
    new_id: IdFactory = uuid4,
) -> Posting:
    """An admin's signed correction. Positive: a never-expiring ADJUSTMENT lot
    (`Posting.issued_lot`), settling debt first like any lot. Negative: taken FIFO from
    `lots`, the rest as debt."""
    if amount == 0:
        raise RuleViolation("an adjustment must not be zero")
    _check_credits(abs(amount))
    reference = adjustment_reference(request_id)
    context = _EntryContext(reason=reason, actor=actor)
    if amount > 0:
        lot = _new_lot(account, new_id(), LotSource.ADJUSTMENT, amount, None, reference, now)
        books = _Books(account, (), now, new_id)
        books.open_lot(lot, EntryKind.ADJUSTMENT, context)
    else:
        books = _Books(account, lots, now, new_id)
        books.take(EntryKind.ADJUSTMENT, -amount, reference, context)
    return books.finish()


# --- operations -----------------------------------------------------------------------------


def open_operation(
    account: Account,
    already_open: Operation | None,
    rate: OperationRate,
    *,
    operation_id: UUID,
    workflow_id: str | None,
    now: datetime,
) -> Operation:
    """Opens an operation at the pinned `rate`, if the balance is 0 or more and the user has no
    other operation open (`already_open`, the user's open operation if any).

    The balance is 0 or more exactly when there is no debt, once the expiry job has written
    off the credits past their expiry; until it has, those dead credits could hide a debt in
    the balance, so the debt is what is checked.
    """
    if account.debt > 0:
        raise FailedPrecondition(
            f"user {account.user_id} owes {account.debt} credits (balance {account.balance}); "
            "operations need a balance of 0 or more",
            reason="NEGATIVE_BALANCE",
            metadata={"user_id": account.user_id},
        )
    if already_open is not None:
        raise FailedPrecondition(
            f"user {account.user_id} already has operation {already_open.operation_id} open",
            reason="OPERATION_ALREADY_OPEN",
            metadata={"operation_id": str(already_open.operation_id)},
        )
    return Operation(
        operation_id=operation_id,
        merchant_id=account.merchant_id,
        user_id=account.user_id,
        rate=rate,
        workflow_id=workflow_id,
        state=OperationState.OPEN,
        opened_at=now,
    )


def _ensure_open(operation: Operation) -> None:
    if operation.state is not OperationState.OPEN:
        raise FailedPrecondition(
            f"operation {operation.operation_id} is {operation.state.value}, no longer open",
            reason="OPERATION_NOT_OPEN",
            metadata={"operation_id": str(operation.operation_id)},
        )


def record_and_close(
    operation: Operation,
    account: Account,
    lots: Iterable[Lot],
    resource_amount: Decimal,
    *,
    now: datetime,
    new_id: IdFactory = uuid4,
) -> OperationClosing:
    """Converts the resource to credits at the pinned rate, debits them FIFO and closes.

    An operation still open past the merchant's timeout may be recorded as long as the
    timeout job has not closed it: the consumption happened and is owed.
    """
    _ensure_open(operation)
    if (operation.merchant_id, operation.user_id) != (account.merchant_id, account.user_id):
        raise ValueError(f"operation {operation.operation_id} belongs to another account")
    rate = operation.rate
    credits = credits_for(resource_amount, rate.credits_per_unit)
    books = _Books(account, lots, now, new_id)
    if credits > 0:
        context = OperationContext(
            operation_id=operation.operation_id,
            operation_code=rate.operation_code,
            operation_version=rate.version,
            resource_amount=resource_amount,
            resource_unit=rate.resource_unit,
            credits_per_unit=rate.credits_per_unit,
            workflow_id=operation.workflow_id,
        )
        reference = operation_reference(operation.operation_id)
        books.take(EntryKind.DEBIT, credits, reference, _EntryContext(operation=context))
    closed = dataclasses.replace(
        operation,
        state=OperationState.CLOSED,
        closed_at=now,
        resource_amount=resource_amount,
        credits=credits,
    )
    return OperationClosing(closed, books.finish())


def cancel_operation(operation: Operation, now: datetime) -> Operation:
    _ensure_open(operation)
    return dataclasses.replace(operation, state=OperationState.CANCELED, closed_at=now)


def timeout_due(operation: Operation, timeout: timedelta, now: datetime) -> bool:
    return operation.state is OperationState.OPEN and operation.opened_at + timeout <= now


def time_out_operation(operation: Operation, timeout: timedelta, now: datetime) -> Operation | None:
    """The operation closed without a debit if it is still open past `timeout`, else None (a
    replica or the caller got there first, or it is not due yet)."""
    if not timeout_due(operation, timeout, now):
        return None
    return dataclasses.replace(operation, state=OperationState.TIMED_OUT, closed_at=now)


# --- balances -------------------------------------------------------------------------------


def summarize_balance(lots: Iterable[Lot], debt: Decimal, at: datetime) -> BalanceSummary:
    """A balance at instant `at` from the lots as they were then (`remaining` as of `at`, lots
    issued later left out by the caller) and the debt then."""
    lots = list(lots)
    usable = sorted((lot for lot in lots if lot.usable_at(at)), key=fifo_key)
    awaiting = sum((lot.remaining for lot in lots_past_expiry(lots, at)), ZERO)
    purchased = sum((lot.remaining for lot in usable if lot.source is LotSource.PURCHASE), ZERO)
    granted = sum((lot.remaining for lot in usable if lot.source is not LotSource.PURCHASE), ZERO)
    expiring = [lot for lot in usable if lot.expires_at is not None]
    next_expiry = min((lot.expires_at for lot in expiring if lot.expires_at), default=None)
    next_credits = sum((lot.remaining for lot in expiring if lot.expires_at == next_expiry), ZERO)
    return BalanceSummary(
        balance=purchased + granted + awaiting - debt,
        debt=debt,
        purchased=purchased,
        granted=granted,
        awaiting_expiry=awaiting,
        next_expiry=next_expiry,
        next_expiring_credits=next_credits,
        lots=tuple(usable),
    )


def lots_past_expiry(lots: Iterable[Lot], at: datetime) -> list[Lot]:
    """Lots whose expiry has come with credits still in them: what the expiry job writes off."""
    return [lot for lot in lots if lot.remaining > 0 and lot.expired_at(at)]


def sum_entries(entries: Sequence[Entry]) -> Decimal:
    return sum((entry.amount for entry in entries), ZERO)
