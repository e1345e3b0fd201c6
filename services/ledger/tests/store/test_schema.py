"""The ledger's schema on the real PostgreSQL: the rules the database enforces on its own,
proven by writing around the domain, and the kept balances matching the domain's books.

The writer here is the minimal one the schema asks for (account, then a new lot's row, then
the posting's entries in order); the store builds on the same order.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID, uuid4

import asyncpg
import pytest
from tally_ledger import domain
from tally_ledger.domain import Account, Entry, EntryKind, Lot, LotSource, Operation, OperationRate, Posting

pytestmark = pytest.mark.integration

MERCHANT = "acme"
USER = "user-1"
T0 = datetime(2030, 1, 1, tzinfo=UTC)
RATE = OperationRate("llm.tokens", 2, "token", Decimal("0.002"))


async def _insert_account(conn: asyncpg.Connection, account: Account) -> None:
    await conn.execute(
        "INSERT INTO accounts (merchant_id, user_id, registered_at) VALUES ($1, $2, $3)",
        account.merchant_id,
        account.user_id,
        account.registered_at,
    )


async def _insert_lot(conn: asyncpg.Connection, lot: Lot, *, order_id: str | None = None) -> None:
    """A new lot's row: empty, as the schema wants; its opening entry fills it."""
    purchase = lot.source is LotSource.PURCHASE
    await conn.execute(
        """
        INSERT INTO lots (merchant_id, lot_id, user_id, source, credits, issued_at, expires_at, reference,
                          product_id, order_id, paid_amount_minor, paid_currency, provider_reference)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
        """,
        lot.merchant_id,
        lot.lot_id,
        lot.user_id,
        lot.source.value,
        lot.credits,
        lot.issued_at,
        lot.expires_at,
        lot.reference,
        lot.product_id or (uuid4() if purchase else None),
        order_id or lot.order_id,
        1999 if purchase else None,
        "EUR" if purchase else None,
        "psp-1" if purchase else None,
    )


async def _insert_entries(conn: asyncpg.Connection, entries: Iterable[Entry]) -> None:
    await conn.executemany(
        """
        INSERT INTO entries (merchant_id, entry_id, user_id, kind, amount, lot_id, occurred_at, reference,
                             operation_id, operation_code, operation_version, resource_amount, resource_unit,
                             credits_per_unit, workflow_id, revoked_lot_id, reason, actor)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
        """,
        [
            (
                e.merchant_id,
                e.entry_id,
                e.user_id,
                e.kind.value,
                e.amount,
                e.lot_id,
                e.occurred_at,
                e.reference,
                e.operation and e.operation.operation_id,
                e.operation and e.operation.operation_code,
                e.operation and e.operation.operation_version,
                e.operation and e.operation.resource_amount,
                e.operation and e.operation.resource_unit,
                e.operation and e.operation.credits_per_unit,
                e.operation and e.operation.workflow_id,
                e.revoked_lot_id,
                e.reason,
                e.actor,
            )
            for e in entries
        ],
    )


async def _insert_operation(conn: asyncpg.Connection, operation: Operation) -> None:
    await conn.execute(
        """
        INSERT INTO operations (merchant_id, operation_id, user_id, operation_code, operation_version,
                                resource_unit, credits_per_unit, workflow_id, state, opened_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
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


async def _close_operation(conn: asyncpg.Connection, operation: Operation) -> None:
    await conn.execute(
        """
        UPDATE operations SET state = $3, closed_at = $4, resource_amount = $5, credits = $6
         WHERE merchant_id = $1 AND operation_id = $2
        """,
        operation.merchant_id,
        operation.operation_id,
        operation.state.value,
        operation.closed_at,
        operation.resource_amount,
        operation.credits,
    )


class Books:
    """One account kept by the domain and written to the database posting by posting."""

    def __init__(self, conn: asyncpg.Connection, user_id: str = USER) -> None:
        self.conn = conn
        self.account = domain.new_account(MERCHANT, user_id, T0)
        self.lots: dict[UUID, Lot] = {}

    async def open(self) -> Books:
        await _insert_account(self.conn, self.account)
        return self

    async def write(self, posting: Posting) -> Posting:
        assert posting.account_before == self.account
        if posting.issued_lot is not None:
            await _insert_lot(self.conn, posting.issued_lot)
        await _insert_entries(self.conn, posting.entries)
        for lot in posting.lots:
            if lot.reversal is not None and self.lots.get(lot.lot_id, lot).reversal is not lot.reversal:
                await self.conn.execute(
                    "UPDATE lots SET reversal = $3, reversed_at = $4 WHERE merchant_id = $1 AND lot_id = $2",
                    MERCHANT,
                    lot.lot_id,
                    lot.reversal.value,
                    lot.reversed_at,
                )
        self.account = posting.account
        self.lots.update((lot.lot_id, lot) for lot in posting.lots)
        await self.check()
        return posting

    async def check(self) -> None:
        """The database's kept balances are the domain's, to the millionth."""
        account = await self.conn.fetchrow(
            "SELECT balance, debt FROM accounts WHERE merchant_id = $1 AND user_id = $2",
            MERCHANT,
            self.account.user_id,
        )
        assert (account["balance"], account["debt"]) == (self.account.balance, self.account.debt)
        rows = await self.conn.fetch(
            "SELECT lot_id, remaining, consumed FROM lots WHERE merchant_id = $1 AND user_id = $2",
            MERCHANT,
            self.account.user_id,
        )
        assert {r["lot_id"]: (r["remaining"], r["consumed"]) for r in rows} == {
            lot.lot_id: (lot.remaining, lot.consumed) for lot in self.lots.values()
        }

    async def issue(
        self, credits: str, *, at: datetime = T0, days: int | None = None, order: str = ""
    ) -> Lot:
        posting = domain.issue_lot(
            self.account,
            source=LotSource.PURCHASE if order else LotSource.GRANT,
            credits=Decimal(credits),
            expires_at=domain.lot_expiry(at, days),
            reference=domain.order_reference(order) if order else domain.grant_reference(f"g-{uuid4()}"),
            now=at,
            product_id=uuid4() if order else None,
            order_id=order or None,
        )
        await self.write(posting)
        assert posting.issued_lot is not None
        return self.lots[posting.issued_lot.lot_id]

    async def operate(self, resource: str, *, at: datetime = T0) -> Operation:
        operation = domain.open_operation(
            self.account, None, RATE, operation_id=uuid4(), workflow_id="wf", now=at
        )
        await _insert_operation(self.conn, operation)
        closing = domain.record_and_close(
            operation, self.account, self.lots.values(), Decimal(resource), now=at
        )
        await self.write(closing.posting)
        await _close_operation(self.conn, closing.operation)
        return closing.operation


async def _refused(conn: asyncpg.Connection, error: type[Exception], sql: str, *args: object) -> None:
    """`sql` fails with `error`, inside a savepoint so the test's transaction goes on."""
    with pytest.raises(error):
        async with conn.transaction():
            await conn.execute(sql, *args)


# --- the kept balances ----------------------------------------------------------------------


async def test_the_kept_balances_follow_the_domain_through_every_kind_of_entry(
    conn: asyncpg.Connection,
) -> None:
    books = await Books(conn).open()
    bought = await books.issue("10", days=30, order="ord-1")
    await books.issue("3", days=1)
    await books.operate("8000", at=T0 + timedelta(hours=1))  # 16 credits: 3 + 10, then 3 of debt
    assert books.account.debt == 3
    await books.issue("5", at=T0 + timedelta(hours=2))  # settles the debt
    await books.write(
        domain.apply_adjustment(
            books.account,
            books.lots.values(),
            amount=Decimal("-0.5"),
            reason="correction",
            actor="ops",
            request_id="adj-1",
            now=T0 + timedelta(hours=3),
        )
    )
    chargeback = domain.apply_chargeback(
        books.account,
        books.lots[bought.lot_id],
        books.lots.values(),
        chargeback="cb-1",
        now=T0 + timedelta(hours=4),
    )
    await books.write(chargeback.posting)
    assert (books.account.balance, books.account.debt) == (Decimal("-8.5"), Decimal("8.5"))
    await books.issue("20", at=T0 + timedelta(days=2), days=1)
    expiring = books.lots[next(reversed(books.lots))]
    await books.write(domain.expire_lot(books.account, expiring, now=T0 + timedelta(days=3)))
    assert books.account.balance == 0
    # Every deferred check (settlement pairs) passes for what was written.
    await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")

    # Balance as of any instant = the sum of the entries up to it; debt = minus those without a lot.
    as_of = """
        SELECT coalesce(sum(amount), 0) AS balance,
               -coalesce(sum(amount) FILTER (WHERE lot_id IS NULL), 0) AS debt
          FROM entries WHERE merchant_id = $1 AND user_id = $2 AND occurred_at <= $3
    """
    assert tuple(await conn.fetchrow(as_of, MERCHANT, USER, T0 + timedelta(hours=1))) == (
        Decimal(-3),
        Decimal(3),
    )
    assert tuple(await conn.fetchrow(as_of, MERCHANT, USER, T0 + timedelta(hours=2))) == (
        Decimal(2),
        Decimal(0),
    )
    assert tuple(await conn.fetchrow(as_of, MERCHANT, USER, T0 + timedelta(days=5))) == (
        Decimal(0),
        Decimal(0),
    )


# --- append-only, and balances only through entries ------------------------------------------


async def test_entries_refuse_update_delete_and_truncate(conn: asyncpg.Connection) -> None:
    books = await Books(conn).open()
    await books.issue("5")
    for sql in (
        "UPDATE entries SET amount = 500",
        "UPDATE entries SET reference = 'forged'",
        "DELETE FROM entries",
        "TRUNCATE entries CASCADE",
    ):
        await _refused(conn, asyncpg.RestrictViolationError, sql)
    assert await conn.fetchval("SELECT count(*) FROM entries") == 1


async def test_balances_and_lots_change_only_through_entries(conn: asyncpg.Connection) -> None:
    books = await Books(conn).open()
    lot = await books.issue("5")
    await _refused(conn, asyncpg.RestrictViolationError, "UPDATE accounts SET balance = 1000")
    await _refused(conn, asyncpg.RestrictViolationError, "UPDATE accounts SET debt = 0.5")
    await _refused(conn, asyncpg.RestrictViolationError, "DELETE FROM accounts")
    await _refused(conn, asyncpg.RestrictViolationError, "UPDATE lots SET remaining = 1")
    await _refused(conn, asyncpg.RestrictViolationError, "UPDATE lots SET credits = 50")
    await _refused(conn, asyncpg.RestrictViolationError, "DELETE FROM lots")
    await _refused(
        conn,
        asyncpg.CheckViolationError,
        """
        INSERT INTO accounts (merchant_id, user_id, balance, registered_at)
        VALUES ('acme', 'rich', 100, now())
        """,
    )
    await _refused(
        conn,
        asyncpg.CheckViolationError,
        """
        INSERT INTO lots (merchant_id, lot_id, user_id, source, credits, remaining, issued_at, reference)
        VALUES ('acme', gen_random_uuid(), 'user-1', 'grant', 5, 5, now(), 'grant:x')
        """,
    )
    await books.check()
    assert books.lots[lot.lot_id].remaining == 5


async def test_a_lot_opens_once_by_one_entry_of_its_full_credits(conn: asyncpg.Connection) -> None:
    books = await Books(conn).open()
    lot = await books.issue("5")
    opening = _entry(EntryKind.LOT_ISSUED, Decimal(5), lot.lot_id)
    with pytest.raises(asyncpg.CheckViolationError, match="opened once"):
        async with conn.transaction():
            await _insert_entries(conn, [opening])
    unopened = dataclasses.replace(lot, lot_id=uuid4())
    await _insert_lot(conn, unopened)
    with pytest.raises(asyncpg.CheckViolationError, match="opened once"):
        async with conn.transaction():
            await _insert_entries(conn, [_entry(EntryKind.LOT_ISSUED, Decimal(4), unopened.lot_id)])


async def test_expired_credits_are_never_consumed_and_only_expired_lots_expire(
    conn: asyncpg.Connection,
) -> None:
    books = await Books(conn).open()
    lot = await books.issue("5", days=1)
    expiry = T0 + timedelta(days=1)
    late_adjustment = _entry(EntryKind.ADJUSTMENT, Decimal(-1), lot.lot_id, at=expiry, reason="r", actor="a")
    with pytest.raises(asyncpg.CheckViolationError, match="never consumed"):
        async with conn.transaction():
            await _insert_entries(conn, [late_adjustment])
    early_expiry = _entry(EntryKind.EXPIRY, Decimal(-5), lot.lot_id, at=expiry - timedelta(seconds=1))
    with pytest.raises(asyncpg.CheckViolationError, match="has not expired"):
        async with conn.transaction():
            await _insert_entries(conn, [early_expiry])
    await books.write(domain.expire_lot(books.account, lot, now=expiry))


async def test_a_lot_never_holds_more_than_its_credits_nor_less_than_nothing(
    conn: asyncpg.Connection,
) -> None:
    books = await Books(conn).open()
    lot = await books.issue("5")
    overdraw = _entry(EntryKind.ADJUSTMENT, Decimal(-6), lot.lot_id, reason="r", actor="a")
    await _refused_entries(conn, asyncpg.CheckViolationError, [overdraw])
    unbacked_credit = _entry(EntryKind.DEBT_SETTLEMENT, Decimal(1), None)
    # An entry without a lot may only clear debt that exists.
    await _refused_entries(conn, asyncpg.CheckViolationError, [unbacked_credit])


async def test_settlement_pairs_must_balance_by_commit(conn: asyncpg.Connection) -> None:
    books = await Books(conn).open()
    await books.operate("1000")  # debt 2
    lot = Lot(
        lot_id=uuid4(),
        merchant_id=MERCHANT,
        user_id=USER,
        source=LotSource.GRANT,
        credits=Decimal(5),
        remaining=Decimal(5),
        consumed=Decimal(0),
        issued_at=T0,
        expires_at=None,
        reference="grant:half-pair",
    )
    await _insert_lot(conn, lot)
    reference = domain.settlement_reference(lot.lot_id)
    await _insert_entries(
        conn,
        [
            _entry(EntryKind.LOT_ISSUED, Decimal(5), lot.lot_id),
            _entry(EntryKind.DEBT_SETTLEMENT, Decimal(-2), lot.lot_id, reference=reference),
        ],
    )
    with pytest.raises(asyncpg.CheckViolationError, match="balanced pair"):
        async with conn.transaction():
            await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")


async def test_entries_carry_their_context(conn: asyncpg.Connection) -> None:
    books = await Books(conn).open()
    lot = await books.issue("5")
    bare_debit = _entry(EntryKind.DEBIT, Decimal(-1), lot.lot_id)
    await _refused_entries(conn, asyncpg.CheckViolationError, [bare_debit])
    anonymous_adjustment = _entry(EntryKind.ADJUSTMENT, Decimal(-1), lot.lot_id)
    await _refused_entries(conn, asyncpg.CheckViolationError, [anonymous_adjustment])
    refund_elsewhere = _entry(EntryKind.REFUND_REVOCATION, Decimal(-1), lot.lot_id, revoked_lot_id=uuid4())
    await _refused_entries(conn, asyncpg.CheckViolationError, [refund_elsewhere])
    other = await Books(conn, "user-2").open()
    someone_elses_lot = dataclasses.replace(
        _entry(EntryKind.ADJUSTMENT, Decimal(-1), lot.lot_id, reason="r", actor="a"),
        user_id=other.account.user_id,
    )
    await _refused_entries(conn, asyncpg.ForeignKeyViolationError, [someone_elses_lot])


# --- one of a kind --------------------------------------------------------------------------


async def test_one_open_operation_per_merchant_and_user(conn: asyncpg.Connection) -> None:
    books = await Books(conn).open()
    first = domain.open_operation(books.account, None, RATE, operation_id=uuid4(), workflow_id=None, now=T0)
    await _insert_operation(conn, first)
    second = domain.open_operation(books.account, None, RATE, operation_id=uuid4(), workflow_id=None, now=T0)
    with pytest.raises(asyncpg.UniqueViolationError, match="operations_one_open_per_user"):
        async with conn.transaction():
            await _insert_operation(conn, second)
    # Another user may; and once the first is closed, so may this one.
    other = await Books(conn, "user-2").open()
    await _insert_operation(
        conn, domain.open_operation(other.account, None, RATE, operation_id=uuid4(), workflow_id=None, now=T0)
    )
    await _close_operation(conn, domain.cancel_operation(first, T0 + timedelta(seconds=1)))
    await _insert_operation(conn, second)


async def test_an_operation_leaves_the_open_state_once(conn: asyncpg.Connection) -> None:
    books = await Books(conn).open()
    operation = await books.operate("0")
    await _refused(
        conn,
        asyncpg.RestrictViolationError,
        """
        UPDATE operations SET state = 'canceled', resource_amount = NULL, credits = NULL
         WHERE operation_id = $1
        """,
        operation.operation_id,
    )
    await _refused(conn, asyncpg.RestrictViolationError, "DELETE FROM operations")


async def test_one_lot_per_settled_order(conn: asyncpg.Connection) -> None:
    books = await Books(conn).open()
    await books.issue("10", days=30, order="ord-1")
    with pytest.raises(asyncpg.UniqueViolationError, match="lots_one_per_order"):
        async with conn.transaction():
            await books.issue("10", days=30, order="ord-1")
    await books.issue("10", days=30, order="ord-2")


async def test_one_lot_per_grant_key_and_one_chargeback_per_order(conn: asyncpg.Connection) -> None:
    books = await Books(conn).open()
    first, second = await books.issue("1"), await books.issue("1")
    grant = """
        INSERT INTO grants_applied (merchant_id, grant_key, user_id, lot_id, applied_at)
        VALUES ($1, $2, $3, $4, $5)
    """
    await conn.execute(grant, MERCHANT, "cashback_pay-1", USER, first.lot_id, T0)
    await _refused(
        conn, asyncpg.UniqueViolationError, grant, MERCHANT, "cashback_pay-1", USER, second.lot_id, T0
    )
    await _refused(conn, asyncpg.RestrictViolationError, "DELETE FROM grants_applied")

    bought = await books.issue("10", days=30, order="ord-1")
    reversal = """
        INSERT INTO lot_reversals (merchant_id, kind, reference, user_id, order_id, lot_id,
                                   amount_minor, currency, credits_revoked, applied_at)
        VALUES ($1, $2, $3, $4, 'ord-1', $5, 1999, 'EUR', 10, $6)
    """
    await conn.execute(reversal, MERCHANT, "refund", "re-1", USER, bought.lot_id, T0)
    await conn.execute(reversal, MERCHANT, "refund", "re-2", USER, bought.lot_id, T0)
    await conn.execute(reversal, MERCHANT, "chargeback", "cb-1", USER, bought.lot_id, T0)
    await _refused(
        conn, asyncpg.UniqueViolationError, reversal, MERCHANT, "chargeback", "cb-2", USER, bought.lot_id, T0
    )
    await _refused(
        conn, asyncpg.UniqueViolationError, reversal, MERCHANT, "refund", "re-1", USER, bought.lot_id, T0
    )


async def test_a_reversal_only_moves_forward(conn: asyncpg.Connection) -> None:
    books = await Books(conn).open()
    bought = await books.issue("10", days=30, order="ord-1")
    refund = domain.apply_refund(books.account, bought, refund="re-1", now=T0)
    await books.write(refund.posting)
    await _refused(
        conn,
        asyncpg.RestrictViolationError,
        "UPDATE lots SET reversal = NULL, reversed_at = NULL WHERE lot_id = $1",
        bought.lot_id,
    )
    chargeback = domain.apply_chargeback(
        books.account, refund.lot, books.lots.values(), chargeback="cb-1", now=T0
    )
    await books.write(chargeback.posting)
    await _refused(
        conn,
        asyncpg.RestrictViolationError,
        "UPDATE lots SET reversal = 'refunded' WHERE lot_id = $1",
        bought.lot_id,
    )
    grant = await books.issue("1")
    await _refused(
        conn,
        asyncpg.CheckViolationError,
        "UPDATE lots SET reversal = 'refunded', reversed_at = $2 WHERE lot_id = $1",
        grant.lot_id,
        T0,
    )


# --- helpers --------------------------------------------------------------------------------

_entry_ids = (UUID(int=n) for n in itertools.count(10**9))


def _entry(
    kind: EntryKind,
    amount: Decimal,
    lot_id: UUID | None,
    *,
    at: datetime = T0,
    reference: str = "test:entry",
    revoked_lot_id: UUID | None = None,
    reason: str | None = None,
    actor: str | None = None,
) -> Entry:
    return Entry(
        entry_id=next(_entry_ids),
        merchant_id=MERCHANT,
        user_id=USER,
        kind=kind,
        amount=amount,
        lot_id=lot_id,
        occurred_at=at,
        reference=reference,
        revoked_lot_id=revoked_lot_id,
        reason=reason,
        actor=actor,
    )


async def _refused_entries(conn: asyncpg.Connection, error: type[Exception], entries: list[Entry]) -> None:
    with pytest.raises(error):
        async with conn.transaction():
            await _insert_entries(conn, entries)
