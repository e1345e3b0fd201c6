"""The ledger's SQL: async functions over one merchant database's connection.

The caller owns the transaction. Every query filters on `merchant_id`, even though each
merchant has a database of its own, and binds every value.

Balances are the database's to keep: the trigger on `entries` applies each entry to its
account and lot, in the entry's transaction. So accounts and lots are inserted empty, a
posting is written as its entries (`write_posting`), and what the domain computed is
compared with what the triggers kept, never written over it. Write order, which every
mutation follows: lock the account row (`lock_account`), insert a new lot's row
(`insert_lot`), insert the posting's entries in order (`write_posting`), then record a
reversal (`save_reversal`) or an operation's end (`end_operation`, or `write_posting`'s
`ending`, which saves a closing a round trip: on this path each statement's round trip costs
more than its work).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Literal
from uuid import UUID

import asyncpg
from tally_kit.amounts import Money
from tally_kit.db.migrations import MigrationSource
from tally_kit.pagination import Page, PageRequest, page_of

from tally_ledger.domain import (
    ZERO,
    Account,
    Entry,
    EntryKind,
    GrantSpec,
    Lot,
    LotSource,
    LotState,
    Operation,
    OperationContext,
    OperationRate,
    OperationState,
    Posting,
    PurchaseOrder,
    Reversal,
)

# Applied to every merchant database after the kit's own migrations.
MIGRATIONS = MigrationSource("ledger", Path(__file__).resolve().parent / "migrations")

ReversalKind = Literal["refund", "chargeback"]


class OperationNotOpen(RuntimeError):
    """The operation a posting was to end was no longer open: ended, under the account lock, by
    a transaction the caller's read of the operation predates. Raised inside the transaction,
    so nothing of the posting is kept."""

    def __init__(self, operation_id: UUID) -> None:
        super().__init__(f"operation {operation_id} was no longer open")
        self.operation_id = operation_id


class BooksMismatch(RuntimeError):
    """What the database's triggers kept differs from what the domain computed: a bug, never
    a refusal. Raised inside the transaction, so nothing of the posting is kept."""


@dataclass(frozen=True)
class Purchase:
    """A settled order: its lot and the payment it was settled with."""

    lot: Lot
    order: PurchaseOrder


@dataclass(frozen=True)
class AppliedGrant:
    grant_key: str
    spec: GrantSpec
    lot: Lot


@dataclass(frozen=True)
class LotReversal:
    """One refund or chargeback applied to a purchase lot, by its own reference."""

    kind: ReversalKind
    reference: str
    user_id: str
    order_id: str
    lot_id: UUID
    amount: Money
    credits_revoked: Decimal
    reason: str | None
    applied_at: datetime


# --- accounts -------------------------------------------------------------------------------

_ACCOUNT_COLUMNS = "merchant_id, user_id, balance, debt, registered_at"


def _account(row: asyncpg.Record, prefix: str = "") -> Account:
    return Account(
        merchant_id=row[f"{prefix}merchant_id"],
        user_id=row[f"{prefix}user_id"],
        balance=row[f"{prefix}balance"],
        debt=row[f"{prefix}debt"],
        registered_at=row[f"{prefix}registered_at"],
    )


async def insert_account(conn: asyncpg.Connection, account: Account) -> bool:
    """Opens an empty account; False when the user is registered already (perhaps by a
    transaction that committed while this one waited)."""
    inserted = await conn.fetchval(
        """
        INSERT INTO accounts (merchant_id, user_id, registered_at) VALUES ($1, $2, $3)
        ON CONFLICT DO NOTHING
        RETURNING true
        """,
        account.merchant_id,
        account.user_id,
        account.registered_at,
    )
    return bool(inserted)


async def lock_account(conn: asyncpg.Connection, merchant_id: str, user_id: str) -> Account | None:
    """The account, its row locked until the transaction ends: every change of a user's books
    takes this lock first, so one user's changes run one at a time and other users' never
    wait on them. Statements after it see whatever the transactions it waited for committed."""
    row = await conn.fetchrow(
        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE merchant_id = $1 AND user_id = $2 FOR UPDATE",
        merchant_id,
        user_id,
    )
    return _account(row) if row is not None else None


async def lock_account_of_operation(
    conn: asyncpg.Connection, merchant_id: str, operation_id: UUID
) -> Account | None:
    """`lock_account` of the operation's user, in one statement (an operation's user never
    changes); None when the operation does not exist."""
    row = await conn.fetchrow(
        f"""
        SELECT {_ACCOUNT_COLUMNS} FROM accounts
         WHERE merchant_id = $1
           AND user_id = (SELECT user_id FROM operations WHERE merchant_id = $1 AND operation_id = $2)
           FOR UPDATE
        """,
        merchant_id,
        operation_id,
    )
    return _account(row) if row is not None else None


async def get_account(conn: asyncpg.Connection, merchant_id: str, user_id: str) -> Account | None:
    row = await conn.fetchrow(
        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE merchant_id = $1 AND user_id = $2",
        merchant_id,
        user_id,
    )
    return _account(row) if row is not None else None


# --- lots -----------------------------------------------------------------------------------

_LOT_COLUMNS = """
    merchant_id, lot_id, user_id, source, credits, remaining, consumed, issued_at, expires_at,
    reference, product_id, order_id, paid_amount_minor, paid_currency, provider_reference,
    payment_id, reversal, reversed_at
"""
# The same columns of the lots aliased `l` in a join.
_L_LOT_COLUMNS = ", ".join(f"l.{column.strip()}" for column in _LOT_COLUMNS.split(","))
# Consumption order (the domain's fifo_key), served by the lots_fifo index.
_FIFO_ORDER = "expires_at ASC NULLS LAST, issued_at, lot_id"


def _lot(row: asyncpg.Record) -> Lot:
    reversal = row["reversal"]
    return Lot(
        lot_id=row["lot_id"],
        merchant_id=row["merchant_id"],
        user_id=row["user_id"],
        source=LotSource(row["source"]),
        credits=row["credits"],
        remaining=row["remaining"],
        consumed=row["consumed"],
        issued_at=row["issued_at"],
        expires_at=row["expires_at"],
        reference=row["reference"],
        product_id=row["product_id"],
        order_id=row["order_id"],
        reversal=Reversal(reversal) if reversal is not None else None,
        reversed_at=row["reversed_at"],
    )


def _purchase(row: asyncpg.Record) -> Purchase:
    lot = _lot(row)
    assert lot.order_id is not None and lot.product_id is not None
    order = PurchaseOrder(
        order_id=lot.order_id,
        user_id=lot.user_id,
        product_id=lot.product_id,
        amount_paid=Money(amount_minor=row["paid_amount_minor"], currency=row["paid_currency"]),
        provider_reference=row["provider_reference"],
        payment_id=row["payment_id"],
    )
    return Purchase(lot=lot, order=order)


async def insert_lot(conn: asyncpg.Connection, lot: Lot, order: PurchaseOrder | None = None) -> bool:
    """Inserts a new lot's row, empty: its opening entry fills it. A purchase lot carries its
    `order`; False when another transaction settled that order first (one lot per order)."""
    if (lot.source is LotSource.PURCHASE) != (order is not None):
        raise ValueError("exactly the purchase lots carry their order")
    inserted = await conn.fetchval(
        """
        INSERT INTO lots (merchant_id, lot_id, user_id, source, credits, issued_at, expires_at, reference,
                          product_id, order_id, paid_amount_minor, paid_currency, provider_reference,
                          payment_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
        ON CONFLICT (merchant_id, order_id) WHERE source = 'purchase' DO NOTHING
        RETURNING true
        """,
        lot.merchant_id,
        lot.lot_id,
        lot.user_id,
        lot.source.value,
        lot.credits,
        lot.issued_at,
        lot.expires_at,
        lot.reference,
        lot.product_id,
        lot.order_id,
        order.amount_paid.amount_minor if order else None,
        order.amount_paid.currency if order else None,
        order.provider_reference if order else None,
        order.payment_id if order else None,
    )
    return bool(inserted)


async def live_lots(conn: asyncpg.Connection, merchant_id: str, user_id: str) -> list[Lot]:
    """The user's lots with credits left, in consumption order; those past their expiry are
    included (the domain never takes from them, and the balance counts them apart)."""
    rows = await conn.fetch(
        f"""
        SELECT {_LOT_COLUMNS} FROM lots
         WHERE merchant_id = $1 AND user_id = $2 AND remaining > 0
         ORDER BY {_FIFO_ORDER}
        """,
        merchant_id,
        user_id,
    )
    return [_lot(row) for row in rows]


async def lots_past_expiry(
    conn: asyncpg.Connection, merchant_id: str, user_id: str, now: datetime
) -> list[Lot]:
    """The user's lots whose expiry has come with credits still in them, soonest first."""
    rows = await conn.fetch(
        f"""
        SELECT {_LOT_COLUMNS} FROM lots
         WHERE merchant_id = $1 AND user_id = $2 AND remaining > 0 AND expires_at <= $3
         ORDER BY {_FIFO_ORDER}
        """,
        merchant_id,
        user_id,
        now,
    )
    return [_lot(row) for row in rows]


async def get_lot(conn: asyncpg.Connection, merchant_id: str, lot_id: UUID) -> Lot | None:
    row = await conn.fetchrow(
        f"SELECT {_LOT_COLUMNS} FROM lots WHERE merchant_id = $1 AND lot_id = $2", merchant_id, lot_id
    )
    return _lot(row) if row is not None else None


async def purchase_by_order(conn: asyncpg.Connection, merchant_id: str, order_id: str) -> Purchase | None:
    row = await conn.fetchrow(
        f"""
        SELECT {_LOT_COLUMNS} FROM lots
         WHERE merchant_id = $1 AND order_id = $2 AND source = 'purchase'
        """,
        merchant_id,
        order_id,
    )
    return _purchase(row) if row is not None else None


async def save_reversal(conn: asyncpg.Connection, lot: Lot) -> None:
    """Records what became of a purchase lot's payment (refunded, then perhaps charged back)."""
    if lot.reversal is None or lot.reversed_at is None:
        raise ValueError(f"lot {lot.lot_id} carries no reversal")
    await conn.execute(
        "UPDATE lots SET reversal = $3, reversed_at = $4 WHERE merchant_id = $1 AND lot_id = $2",
        lot.merchant_id,
        lot.lot_id,
        lot.reversal.value,
        lot.reversed_at,
    )


async def list_lots(
    conn: asyncpg.Connection,
    merchant_id: str,
    user_id: str,
    page: PageRequest,
    *,
    states: Sequence[LotState],
    now: datetime,
) -> Page[Lot]:
    """The user's lots by issue (oldest first), only those in one of `states` at `now` when
    any are given. Page key: (issued_at, lot_id)."""
    after_time, after_id = page.after if page.after is not None else (None, None)
    # The CASE is the domain's lot_state at $4.
    rows = await conn.fetch(
        f"""
        SELECT {_LOT_COLUMNS} FROM lots
         WHERE merchant_id = $1 AND user_id = $2
           AND ($3::text[] IS NULL OR CASE
                   WHEN reversal = 'charged_back' THEN 'charged_back'
                   WHEN reversal = 'refunded' THEN 'refunded'
                   WHEN expires_at <= $4 THEN 'expired'
                   WHEN remaining = 0 THEN 'depleted'
                   ELSE 'active'
               END = ANY($3))
           AND ($5::timestamptz IS NULL OR (issued_at, lot_id) > ($5, $6::uuid))
         ORDER BY issued_at, lot_id
         LIMIT $7
        """,
        merchant_id,
        user_id,
        [state.value for state in states] if states else None,
        now,
        after_time,
        after_id,
        page.size + 1,
    )
    return page_of([_lot(row) for row in rows], page, lambda lot: (lot.issued_at, lot.lot_id))


# --- balances -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BalanceState:
    """A user's books at one instant: the debt and every lot holding credits then."""

    debt: Decimal
    # Lots as they were at the instant (credits left, reversal), in consumption order.
    lots: list[Lot]


async def current_balance(conn: asyncpg.Connection, merchant_id: str, user_id: str) -> BalanceState | None:
    """The kept balance and the lots with credits left, read in one statement (one snapshot):
    its cost follows the number of live lots, never the length of the history. None for a
    user never registered."""
    rows = await conn.fetch(
        f"""
        SELECT a.debt AS account_debt, {_L_LOT_COLUMNS}
          FROM accounts a
          LEFT JOIN lots l ON l.merchant_id = a.merchant_id AND l.user_id = a.user_id AND l.remaining > 0
         WHERE a.merchant_id = $1 AND a.user_id = $2
         ORDER BY l.expires_at ASC NULLS LAST, l.issued_at, l.lot_id
        """,
        merchant_id,
        user_id,
    )
    if not rows:
        return None
    lots = [_lot(row) for row in rows if row["lot_id"] is not None]
    return BalanceState(debt=rows[0]["account_debt"], lots=lots)


async def balance_as_of(
    conn: asyncpg.Connection, merchant_id: str, user_id: str, at: datetime
) -> BalanceState | None:
    """The books as the entries written up to `at` (inclusive) left them, summed per lot over
    the entries_history index; each lot with its credits left and reversal as of then. None
    for a user never registered."""
    rows = await conn.fetch(
        f"""
        WITH sums AS (
            SELECT lot_id,
                   sum(amount) AS amount,
                   -- What the user had the use of: the domain's `consumes`.
                   -sum(amount) FILTER (
                       WHERE amount < 0 AND (
                           kind IN ('debit', 'debt_settlement', 'adjustment')
                           OR (kind = 'chargeback_revocation' AND revoked_lot_id <> lot_id)
                       )
                   ) AS consumed
              FROM entries
             WHERE merchant_id = $1 AND user_id = $2 AND occurred_at <= $3
             GROUP BY lot_id
        )
        SELECT s.amount AS sum_amount, s.consumed AS sum_consumed, s.lot_id AS sum_lot_id, {_L_LOT_COLUMNS}
          FROM accounts a
          LEFT JOIN (sums s LEFT JOIN lots l ON l.merchant_id = $1 AND l.lot_id = s.lot_id) ON true
         WHERE a.merchant_id = $1 AND a.user_id = $2
        """,
        merchant_id,
        user_id,
        at,
    )
    if not rows:
        return None
    debt = ZERO
    lots: list[Lot] = []
    for row in rows:
        if row["sum_amount"] is None:
            continue  # registered, no entries yet
        if row["sum_lot_id"] is None:
            debt = -row["sum_amount"]
            continue
        lot = _lot(row)
        reversed_then = lot.reversed_at is not None and lot.reversed_at <= at
        lots.append(
            dataclasses.replace(
                lot,
                remaining=row["sum_amount"],
                consumed=row["sum_consumed"] or ZERO,
                reversal=lot.reversal if reversed_then else None,
                reversed_at=lot.reversed_at if reversed_then else None,
            )
        )
    return BalanceState(debt=debt, lots=[lot for lot in lots if lot.remaining > 0])


# --- entries --------------------------------------------------------------------------------

_ENTRY_COLUMNS = """
    entry_seq, merchant_id, entry_id, user_id, kind, amount, lot_id, occurred_at, reference,
    operation_id, operation_code, operation_version, resource_amount, resource_unit,
    credits_per_unit, workflow_id, revoked_lot_id, reason, actor
"""

# One statement whatever the number of entries: each column as an array, unnested in order.
# Rows are inserted, and the balance trigger applies them, in the order given.
_INSERT_ENTRIES = """
INSERT INTO entries (merchant_id, user_id, entry_id, kind, amount, lot_id, occurred_at, reference,
                     operation_id, operation_code, operation_version, resource_amount, resource_unit,
                     credits_per_unit, workflow_id, revoked_lot_id, reason, actor)
SELECT $1, $2, e.entry_id, e.kind, e.amount, e.lot_id, e.occurred_at, e.reference,
       e.operation_id, e.operation_code, e.operation_version, e.resource_amount, e.resource_unit,
       e.credits_per_unit, e.workflow_id, e.revoked_lot_id, e.reason, e.actor
  FROM unnest($3::uuid[], $4::text[], $5::numeric[], $6::uuid[], $7::timestamptz[], $8::text[],
              $9::uuid[], $10::text[], $11::integer[], $12::numeric[], $13::text[],
              $14::numeric[], $15::text[], $16::uuid[], $17::text[], $18::text[])
       WITH ORDINALITY AS e(entry_id, kind, amount, lot_id, occurred_at, reference,
                            operation_id, operation_code, operation_version, resource_amount, resource_unit,
                            credits_per_unit, workflow_id, revoked_lot_id, reason, actor, position)
 ORDER BY e.position
"""

# What the triggers kept: the account (lot_id NULL) and each lot the postings touched.
_KEPT_BOOKS = """
SELECT NULL::uuid AS lot_id, balance AS first, debt AS second, NULL::bigint AS ended
  FROM accounts WHERE merchant_id = $1 AND user_id = $2
UNION ALL
SELECT lot_id, remaining, consumed, NULL
  FROM lots WHERE merchant_id = $1 AND lot_id = ANY($3::uuid[])
"""
# The same, in the statement that also records the end of the operation the postings belong
# to (`ended`: 1 when it was still open), so that a closing costs no round trip more.
_KEPT_BOOKS_ENDING = """
WITH ended AS (
    UPDATE operations SET state = $5, closed_at = $6, resource_amount = $7, credits = $8
     WHERE merchant_id = $1 AND operation_id = $4 AND state = 'open'
    RETURNING operation_id
)
SELECT NULL::uuid AS lot_id, balance AS first, debt AS second, (SELECT count(*) FROM ended) AS ended
  FROM accounts WHERE merchant_id = $1 AND user_id = $2
UNION ALL
SELECT lot_id, remaining, consumed, NULL
  FROM lots WHERE merchant_id = $1 AND lot_id = ANY($3::uuid[])
"""


def _entry(row: asyncpg.Record) -> Entry:
    operation = None
    if row["operation_id"] is not None:
        operation = OperationContext(
            operation_id=row["operation_id"],
            operation_code=row["operation_code"],
            operation_version=row["operation_version"],
            resource_amount=row["resource_amount"],
            resource_unit=row["resource_unit"],
            credits_per_unit=row["credits_per_unit"],
            workflow_id=row["workflow_id"],
        )
    return Entry(
        entry_id=row["entry_id"],
        merchant_id=row["merchant_id"],
        user_id=row["user_id"],
        kind=EntryKind(row["kind"]),
        amount=row["amount"],
        lot_id=row["lot_id"],
        occurred_at=row["occurred_at"],
        reference=row["reference"],
        operation=operation,
        revoked_lot_id=row["revoked_lot_id"],
        reason=row["reason"],
        actor=row["actor"],
    )


async def write_posting(
    conn: asyncpg.Connection, posting: Posting, *, ending: Operation | None = None
) -> None:
    """Appends the posting's entries in order (a new lot's row must exist already), then checks
    that the balances the triggers kept are the posting's: two statements whatever its size.

    `ending` is the operation the posting closes, in its new state: its end is recorded in the
    statement that checks the books (`OperationNotOpen` when it was no longer open)."""
    await write_postings(conn, [posting], ending=ending)


async def write_postings(
    conn: asyncpg.Connection, postings: Sequence[Posting], *, ending: Operation | None = None
) -> None:
    """`write_posting` for postings of one account that follow one another (each starts from
    the account the previous one left): still two statements."""
    if not postings:
        return
    if ending is not None and ending.state is OperationState.OPEN:
        raise ValueError(f"operation {ending.operation_id} is still open")
    account = postings[-1].account
    for previous, posting in itertools.pairwise(postings):
        if posting.account_before != previous.account:
            raise ValueError("each posting must start from the account the previous one left")
    entries = [entry for posting in postings for entry in posting.entries]
    if any((e.merchant_id, e.user_id) != (account.merchant_id, account.user_id) for e in entries):
        raise ValueError("a posting's entries all belong to its account")
    if entries:
        await conn.execute(
            _INSERT_ENTRIES,
            account.merchant_id,
            account.user_id,
            [e.entry_id for e in entries],
            [e.kind.value for e in entries],
            [e.amount for e in entries],
            [e.lot_id for e in entries],
            [e.occurred_at for e in entries],
            [e.reference for e in entries],
            [e.operation.operation_id if e.operation else None for e in entries],
            [e.operation.operation_code if e.operation else None for e in entries],
            [e.operation.operation_version if e.operation else None for e in entries],
            [e.operation.resource_amount if e.operation else None for e in entries],
            [e.operation.resource_unit if e.operation else None for e in entries],
            [e.operation.credits_per_unit if e.operation else None for e in entries],
            [e.operation.workflow_id if e.operation else None for e in entries],
            [e.revoked_lot_id for e in entries],
            [e.reason for e in entries],
            [e.actor for e in entries],
        )
    # Each lot as the last posting touching it left it.
    expected: dict[UUID | None, tuple[Decimal, Decimal]] = {
        lot.lot_id: (lot.remaining, lot.consumed) for posting in postings for lot in posting.lots
    }
    expected[None] = (account.balance, account.debt)
    touched = [lot_id for lot_id in expected if lot_id]
    if ending is None:
        rows = await conn.fetch(_KEPT_BOOKS, account.merchant_id, account.user_id, touched)
    else:
        rows = await conn.fetch(
            _KEPT_BOOKS_ENDING,
            account.merchant_id,
            account.user_id,
            touched,
            ending.operation_id,
            ending.state.value,
            ending.closed_at,
            ending.resource_amount,
            ending.credits,
        )
        if next(row["ended"] for row in rows if row["lot_id"] is None) != 1:
            raise OperationNotOpen(ending.operation_id)
    kept: dict[UUID | None, tuple[Decimal, Decimal]] = {
        row["lot_id"]: (row["first"], row["second"]) for row in rows
    }
    if kept != expected:
        raise BooksMismatch(
            f"user {account.user_id}: the database kept {kept}, the domain computed {expected}"
        )


async def entries_by_reference(
    conn: asyncpg.Connection, merchant_id: str, user_id: str, reference: str
) -> list[Entry]:
    """The user's entries caused by one reference (e.g. `refund:<reference>`), in order."""
    rows = await conn.fetch(
        f"""
        SELECT {_ENTRY_COLUMNS} FROM entries
         WHERE merchant_id = $1 AND user_id = $2 AND reference = $3
         ORDER BY entry_seq
        """,
        merchant_id,
        user_id,
        reference,
    )
    return [_entry(row) for row in rows]


async def history(
    conn: asyncpg.Connection,
    merchant_id: str,
    user_id: str,
    page: PageRequest,
    *,
    kinds: Sequence[EntryKind],
    start: datetime | None,
    end: datetime | None,
    workflow_id: str | None,
) -> Page[Entry]:
    """The user's entries oldest first, in the order written, filtered; page key
    (occurred_at, entry_seq), the entries_history index's order."""
    after_time, after_seq = page.after if page.after is not None else (None, None)
    rows = await conn.fetch(
        f"""
        SELECT {_ENTRY_COLUMNS} FROM entries
         WHERE merchant_id = $1 AND user_id = $2
           AND ($3::text[] IS NULL OR kind = ANY($3))
           AND ($4::timestamptz IS NULL OR occurred_at >= $4)
           AND ($5::timestamptz IS NULL OR occurred_at < $5)
           AND ($6::text IS NULL OR workflow_id = $6)
           AND ($7::timestamptz IS NULL OR (occurred_at, entry_seq) > ($7, $8::bigint))
         ORDER BY occurred_at, entry_seq
         LIMIT $9
        """,
        merchant_id,
        user_id,
        [kind.value for kind in kinds] if kinds else None,
        start,
        end,
        workflow_id,
        after_time,
        after_seq,
        page.size + 1,
    )
    keyed = page_of(
        [(row["occurred_at"], row["entry_seq"], _entry(row)) for row in rows],
        page,
        lambda item: (item[0], item[1]),
    )
    return Page(items=[item[2] for item in keyed.items], next_page_token=keyed.next_page_token)


# --- operations -----------------------------------------------------------------------------

_OPERATION_COLUMNS = """
    merchant_id, operation_id, user_id, operation_code, operation_version, resource_unit,
    credits_per_unit, workflow_id, state, opened_at, closed_at, resource_amount, credits
"""


# The same columns of the operation aliased `o` in a join, each named `o_<column>`.
_O_OPERATION_COLUMNS = ", ".join(
    f"o.{column.strip()} AS o_{column.strip()}" for column in _OPERATION_COLUMNS.split(",")
)


def _operation(row: asyncpg.Record, prefix: str = "") -> Operation:
    return Operation(
        operation_id=row[f"{prefix}operation_id"],
        merchant_id=row[f"{prefix}merchant_id"],
        user_id=row[f"{prefix}user_id"],
        rate=OperationRate(
            operation_code=row[f"{prefix}operation_code"],
            version=row[f"{prefix}operation_version"],
            resource_unit=row[f"{prefix}resource_unit"],
            credits_per_unit=row[f"{prefix}credits_per_unit"],
        ),
        workflow_id=row[f"{prefix}workflow_id"],
        state=OperationState(row[f"{prefix}state"]),
        opened_at=row[f"{prefix}opened_at"],
        closed_at=row[f"{prefix}closed_at"],
        resource_amount=row[f"{prefix}resource_amount"],
        credits=row[f"{prefix}credits"],
    )


async def insert_operation(conn: asyncpg.Connection, operation: Operation) -> bool:
    """Inserts an open operation; False when the user has another one open (one per user)."""
    inserted = await conn.fetchval(
        """
        INSERT INTO operations (merchant_id, operation_id, user_id, operation_code, operation_version,
                                resource_unit, credits_per_unit, workflow_id, state, opened_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        ON CONFLICT (merchant_id, user_id) WHERE state = 'open' DO NOTHING
        RETURNING true
        """,
        operation.merchant_id,
        operation.operation_id,
        operation.user_id,
        operation.rate.operation_code,
        operation.rate.version,
        operation.rate.resource_unit,
        operation.rate.credits_per_unit,
        operation.workflow_id,
        operation.state.value,
        operation.opened_at,
    )
    return bool(inserted)


async def get_operation(conn: asyncpg.Connection, merchant_id: str, operation_id: UUID) -> Operation | None:
    row = await conn.fetchrow(
        f"SELECT {_OPERATION_COLUMNS} FROM operations WHERE merchant_id = $1 AND operation_id = $2",
        merchant_id,
        operation_id,
    )
    return _operation(row) if row is not None else None


# The account of the operation's user, locked (`lock_account_of_operation`), with the operation
# and the user's live lots (`operation_with_live_lots`). `as_read` compares the locked version
# of the account with the one in the statement's snapshot: when the lock waited for (or found)
# a change of the account, it returns the account's newest version but the operation and lots
# as the snapshot had them.
_LOCK_OPERATION_WITH_LIVE_LOTS = f"""
SELECT {", ".join(f"a.{column.strip()} AS a_{column.strip()}" for column in _ACCOUNT_COLUMNS.split(","))},
       a.xmin = (SELECT s.xmin FROM accounts s WHERE s.merchant_id = a.merchant_id AND s.user_id = a.user_id)
           AS as_read,
       {_O_OPERATION_COLUMNS}, {_L_LOT_COLUMNS}
  FROM operations o
  JOIN accounts a ON a.merchant_id = o.merchant_id AND a.user_id = o.user_id
  LEFT JOIN lots l ON l.merchant_id = o.merchant_id AND l.user_id = o.user_id AND l.remaining > 0
 WHERE o.merchant_id = $1 AND o.operation_id = $2
 ORDER BY l.expires_at ASC NULLS LAST, l.issued_at, l.lot_id
   FOR UPDATE OF a
"""


@dataclass(frozen=True)
class LockedOperation:
    """An operation's account, locked, with the operation and the user's live lots."""

    account: Account
    operation: Operation
    lots: list[Lot]


async def lock_operation_with_live_lots(
    conn: asyncpg.Connection, merchant_id: str, operation_id: UUID
) -> LockedOperation | None:
    """`lock_account_of_operation` then `operation_with_live_lots`, in one statement unless the
    account changed since the statement's snapshot (the lock waited for another transaction of
    the user's): the lots are then read again under the lock. None when the operation does not
    exist.

    Every change of a lot writes entries, which change the account, so lots read in one
    statement are those under the lock. The operation can still be older than the lock when a
    transaction that did not change the account (a cancel, a timeout) ended it meanwhile: its
    end is then refused by `write_posting` (`OperationNotOpen`)."""
    rows = await conn.fetch(_LOCK_OPERATION_WITH_LIVE_LOTS, merchant_id, operation_id)
    if not rows:
        return None
    account = _account(rows[0], prefix="a_")
    if not rows[0]["as_read"]:
        found = await operation_with_live_lots(conn, merchant_id, operation_id)
        assert found is not None
        operation, lots = found
        return LockedOperation(account, operation, lots)
    lots = [_lot(row) for row in rows if row["lot_id"] is not None]
    return LockedOperation(account, _operation(rows[0], prefix="o_"), lots)


async def operation_with_live_lots(
    conn: asyncpg.Connection, merchant_id: str, operation_id: UUID
) -> tuple[Operation, list[Lot]] | None:
    """The operation and its user's lots with credits left in consumption order (`live_lots`),
    in one statement."""
    rows = await conn.fetch(
        f"""
        SELECT {_O_OPERATION_COLUMNS}, {_L_LOT_COLUMNS}
          FROM operations o
          LEFT JOIN lots l ON l.merchant_id = o.merchant_id AND l.user_id = o.user_id AND l.remaining > 0
         WHERE o.merchant_id = $1 AND o.operation_id = $2
         ORDER BY l.expires_at ASC NULLS LAST, l.issued_at, l.lot_id
        """,
        merchant_id,
        operation_id,
    )
    if not rows:
        return None
    operation = _operation(rows[0], prefix="o_")
    return operation, [_lot(row) for row in rows if row["lot_id"] is not None]


async def open_operation_of(conn: asyncpg.Connection, merchant_id: str, user_id: str) -> Operation | None:
    """The user's open operation, if any."""
    row = await conn.fetchrow(
        f"""
        SELECT {_OPERATION_COLUMNS} FROM operations
         WHERE merchant_id = $1 AND user_id = $2 AND state = 'open'
        """,
        merchant_id,
        user_id,
    )
    return _operation(row) if row is not None else None


async def end_operation(conn: asyncpg.Connection, operation: Operation) -> None:
    """Records that an open operation was closed, canceled or timed out."""
    if operation.state is OperationState.OPEN:
        raise ValueError(f"operation {operation.operation_id} is still open")
    status = await conn.execute(
        """
        UPDATE operations SET state = $3, closed_at = $4, resource_amount = $5, credits = $6
         WHERE merchant_id = $1 AND operation_id = $2 AND state = 'open'
        """,
        operation.merchant_id,
        operation.operation_id,
        operation.state.value,
        operation.closed_at,
        operation.resource_amount,
        operation.credits,
    )
    if status != "UPDATE 1":
        raise _not_open_under_lock(operation)


def _not_open_under_lock(operation: Operation) -> RuntimeError:
    return RuntimeError(f"operation {operation.operation_id} was not open; its account lock was not held")


# --- grants ---------------------------------------------------------------------------------


async def find_grant(conn: asyncpg.Connection, merchant_id: str, grant_key: str) -> AppliedGrant | None:
    row = await conn.fetchrow(
        f"""
        SELECT g.grant_key, {_L_LOT_COLUMNS}
          FROM grants_applied g
          JOIN lots l ON l.merchant_id = g.merchant_id AND l.lot_id = g.lot_id
         WHERE g.merchant_id = $1 AND g.grant_key = $2
        """,
        merchant_id,
        grant_key,
    )
    if row is None:
        return None
    lot = _lot(row)
    spec = GrantSpec(
        user_id=lot.user_id,
        source=lot.source,
        product_id=lot.product_id,
        credits=lot.credits,
        expires_at=lot.expires_at,
    )
    return AppliedGrant(grant_key=row["grant_key"], spec=spec, lot=lot)


async def insert_grant(conn: asyncpg.Connection, grant_key: str, lot: Lot) -> bool:
    """Records the grant key of a lot just issued; False when another transaction used the
    key first (one lot per key and merchant, ever)."""
    inserted = await conn.fetchval(
        """
        INSERT INTO grants_applied (merchant_id, grant_key, user_id, lot_id, product_id, applied_at)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT DO NOTHING
        RETURNING true
        """,
        lot.merchant_id,
        grant_key,
        lot.user_id,
        lot.lot_id,
        lot.product_id,
        lot.issued_at,
    )
    return bool(inserted)


# --- refunds and chargebacks ----------------------------------------------------------------

_REVERSAL_COLUMNS = """
    kind, reference, user_id, order_id, lot_id, amount_minor, currency, credits_revoked, reason, applied_at
"""


def _reversal(row: asyncpg.Record) -> LotReversal:
    return LotReversal(
        kind=row["kind"],
        reference=row["reference"],
        user_id=row["user_id"],
        order_id=row["order_id"],
        lot_id=row["lot_id"],
        amount=Money(amount_minor=row["amount_minor"], currency=row["currency"]),
        credits_revoked=row["credits_revoked"],
        reason=row["reason"],
        applied_at=row["applied_at"],
    )


async def find_reversal(
    conn: asyncpg.Connection, merchant_id: str, kind: ReversalKind, reference: str
) -> LotReversal | None:
    row = await conn.fetchrow(
        f"""
        SELECT {_REVERSAL_COLUMNS} FROM lot_reversals
         WHERE merchant_id = $1 AND kind = $2 AND reference = $3
        """,
        merchant_id,
        kind,
        reference,
    )
    return _reversal(row) if row is not None else None


async def insert_reversal(conn: asyncpg.Connection, merchant_id: str, reversal: LotReversal) -> bool:
    """Records a refund or chargeback; False when its reference was used first by another
    transaction, or (for a chargeback) the order was charged back by one."""
    inserted = await conn.fetchval(
        f"""
        INSERT INTO lot_reversals (merchant_id, {_REVERSAL_COLUMNS})
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
        ON CONFLICT DO NOTHING
        RETURNING true
        """,
        merchant_id,
        reversal.kind,
        reversal.reference,
        reversal.user_id,
        reversal.order_id,
        reversal.lot_id,
        reversal.amount.amount_minor,
        reversal.amount.currency,
        reversal.credits_revoked,
        reversal.reason,
        reversal.applied_at,
    )
    return bool(inserted)


async def refunded_minor(conn: asyncpg.Connection, merchant_id: str, order_id: str) -> int:
    """Every refund of the order so far, in minor units of the currency paid."""
    total = await conn.fetchval(
        """
        SELECT coalesce(sum(amount_minor), 0) FROM lot_reversals
         WHERE merchant_id = $1 AND order_id = $2 AND kind = 'refund'
        """,
        merchant_id,
        order_id,
    )
    return int(total)
