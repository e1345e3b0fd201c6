"""What the ledger's job and handler tests share: the ledger side of a test run (settings,
merchant directory, catalog reader of a `RunningCatalog`), a clock the tests move, service-
layer calls in their own transactions, and SQL probes of the books.

A test folder puts this folder (and the catalog harness's) on sys.path to import it.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TypeVar

import asyncpg
from tally_kit.amounts import Money
from tally_kit.db import MerchantDirectory
from tally_kit.testing import unique_prefix
from tally_kit.uow import Transaction
from tally_ledger.domain import PurchaseOrder
from tally_ledger.services import Issued, Ledger
from tally_ledger.settings import LedgerSettings

T = TypeVar("T")
PRODUCER = "ledger"


def ledger_settings(catalog_target: str, **overrides: object) -> LedgerSettings:
    """Settings of a ledger of this run: unique database prefix and exchange, small pools."""
    prefix = unique_prefix()
    values: dict[str, object] = {
        "db_prefix": prefix,
        "events_exchange": f"{prefix}ledger-tests.events",
        "catalog_target": catalog_target,
        # The PostgreSQL server is shared with other test runs.
        "db_max_pools": 4,
        "db_pool_max_size": 4,
        "db_max_connections": 10,
        **overrides,
    }
    return LedgerSettings(**values)  # type: ignore[arg-type]


class MovingClock:
    """Real time plus an offset the tests only move forward; or a pinned instant."""

    def __init__(self) -> None:
        self._offset = timedelta()
        self.pinned: datetime | None = None

    def __call__(self) -> datetime:
        return self.pinned if self.pinned is not None else datetime.now(UTC) + self._offset

    def advance(self, delta: timedelta) -> None:
        if delta <= timedelta():
            raise ValueError("the clock only moves forward")
        self._offset += delta


class OnlyMerchants:
    """The directory, as a job walks it, limited to some merchants (other tests' are left out)."""

    def __init__(self, directory: MerchantDirectory, merchant_ids: list[str]) -> None:
        self._directory = directory
        self._merchant_ids = merchant_ids

    async def merchant_ids(self) -> list[str]:
        return [m for m in await self._directory.merchant_ids() if m in self._merchant_ids]

    def transaction(self, merchant_id: str) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return self._directory.transaction(merchant_id)

    def connection(self, merchant_id: str) -> AbstractAsyncContextManager[asyncpg.Connection]:
        return self._directory.connection(merchant_id)


async def in_transaction(
    directory: MerchantDirectory, merchant_id: str, work: Callable[[Transaction], Awaitable[T]]
) -> T:
    """`work` in a merchant transaction of its own, as the servicer's unit of work runs it."""
    async with directory.transaction(merchant_id) as conn:
        return await work(Transaction(conn, merchant_id=merchant_id, producer=PRODUCER))


async def settle(
    ledger: Ledger, directory: MerchantDirectory, merchant_id: str, user_id: str, product_id: str
) -> Issued:
    order = PurchaseOrder(
        order_id=f"order-{uuid.uuid4()}",
        user_id=user_id,
        product_id=uuid.UUID(product_id),
        amount_paid=Money(990, "EUR"),
        provider_reference=f"psp-{uuid.uuid4()}",
        payment_id=None,
    )
    return await in_transaction(
        directory, merchant_id, lambda tx: ledger.settle_purchase(tx, merchant_id, order)
    )


@dataclass(frozen=True)
class LotBooks:
    """A lot as its row keeps it and as its entries make it."""

    lot_id: uuid.UUID
    user_id: str
    credits: Decimal
    remaining: Decimal
    consumed: Decimal
    expires_at: datetime | None
    entries_sum: Decimal
    expired: Decimal
    # Revoked by the lot's own refund or chargeback.
    revoked: Decimal
    expiry_entries: int
    # Consumption entries on the lot at or after its expiry (the database must refuse them).
    consumed_after_expiry: int


async def lot_books(directory: MerchantDirectory, merchant_id: str) -> dict[uuid.UUID, LotBooks]:
    async with directory.connection(merchant_id) as conn:
        rows = await conn.fetch(
            """
            SELECT l.lot_id, l.user_id, l.credits, l.remaining, l.consumed, l.expires_at,
                   coalesce(sum(e.amount), 0) AS entries_sum,
                   coalesce(-sum(e.amount) FILTER (WHERE e.kind = 'expiry'), 0) AS expired,
                   coalesce(-sum(e.amount) FILTER (
                       WHERE e.kind IN ('refund_revocation', 'chargeback_revocation')
                         AND e.revoked_lot_id = l.lot_id
                   ), 0) AS revoked,
                   count(*) FILTER (WHERE e.kind = 'expiry') AS expiry_entries,
                   count(*) FILTER (
                       WHERE e.kind IN ('debit', 'debt_settlement', 'adjustment') AND e.amount < 0
                         AND e.occurred_at >= l.expires_at
                   ) AS consumed_after_expiry
              FROM lots l
              LEFT JOIN entries e ON e.merchant_id = l.merchant_id AND e.lot_id = l.lot_id
             WHERE l.merchant_id = $1
             GROUP BY l.merchant_id, l.lot_id
            """,
            merchant_id,
        )
    return {row["lot_id"]: LotBooks(**dict(row)) for row in rows}


async def books_disagreements(directory: MerchantDirectory, merchant_id: str) -> list[str]:
    """Every account whose kept balance or debt, and every lot whose kept credits, differ from
    its entries, or whose credits are not accounted for exactly once (empty when right)."""
    async with directory.connection(merchant_id) as conn:
        accounts = await conn.fetch(
            """
            SELECT a.user_id, a.balance, a.debt,
                   coalesce(sum(e.amount), 0) AS entries,
                   coalesce(-sum(e.amount) FILTER (WHERE e.lot_id IS NULL), 0) AS owed
              FROM accounts a
              LEFT JOIN entries e ON e.merchant_id = a.merchant_id AND e.user_id = a.user_id
             WHERE a.merchant_id = $1
             GROUP BY a.user_id, a.balance, a.debt
            """,
            merchant_id,
        )
    wrong = [
        f"account {row['user_id']}: balance {row['balance']} debt {row['debt']}, "
        f"entries {row['entries']} owed {row['owed']}"
        for row in accounts
        if (row["balance"], row["debt"]) != (row["entries"], row["owed"])
    ]
    for lot in (await lot_books(directory, merchant_id)).values():
        if lot.remaining != lot.entries_sum or lot.remaining < 0:
            wrong.append(f"lot {lot.lot_id}: remaining {lot.remaining}, entries {lot.entries_sum}")
        if lot.expiry_entries > 1 or lot.consumed_after_expiry:
            wrong.append(
                f"lot {lot.lot_id}: {lot.expiry_entries} expiries, {lot.consumed_after_expiry} late debits"
            )
        if lot.remaining + lot.consumed + lot.expired + lot.revoked != lot.credits:
            wrong.append(
                f"lot {lot.lot_id}: credits {lot.credits} != remaining {lot.remaining} + consumed "
                f"{lot.consumed} + expired {lot.expired} + revoked {lot.revoked}"
            )
    return wrong
