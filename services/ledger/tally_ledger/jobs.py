"""The ledger's periodic jobs: expiring lots past their expiry, and closing operations left
open past the merchant's timeout.

Both run on `tally_kit.jobs.PeriodicJob`: every replica walks every merchant database and
claims due work with `FOR UPDATE ... SKIP LOCKED`, so replicas share it and never wait on
each other. What is claimed is the user's account row, which every change of a user's books
locks first (debits, refunds, operations): a job therefore never deadlocks with them and
never races them. A debit that holds the account is skipped and its user taken up by the
next run; a debit that comes while the job holds it waits, then sees the lot expired (its
credits written off) or the operation timed out. A credit is thus either consumed or expired,
never both; the database refuses consumption past a lot's expiry besides.

The work itself is the service layer's (`Ledger.expire_lots_of_user`,
`Ledger.time_out_operation`), each idempotent: an item already handled by another replica
is found no longer due and left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar
from uuid import UUID

import asyncpg
from tally_kit.events.databases import MerchantDatabases
from tally_kit.jobs import ClaimedWork, PeriodicJob, utc_now
from tally_kit.uow import RelayNotifier, Transaction

from tally_ledger.catalog import CatalogReader
from tally_ledger.services import Clock, Ledger

LOT_EXPIRY = "lot_expiry"
OPERATION_TIMEOUT = "operation_timeout"
PRODUCER = "ledger"

K = TypeVar("K")

# The shortest operation timeout the catalog accepts: an operation opened more recently than
# this is due nowhere, so a merchant without older open operations costs no catalog read.
MIN_OPERATION_TIMEOUT = timedelta(seconds=1)

# Accounts with a lot past its expiry and credits left in it, found through the lots' expiry
# index, locked in user order from `after`.
_CLAIM_USERS_WITH_EXPIRED_LOTS = """
SELECT user_id FROM accounts
 WHERE merchant_id = $1 AND user_id > $3
   AND user_id IN (
       SELECT user_id FROM lots
        WHERE merchant_id = $1 AND remaining > 0 AND expires_at IS NOT NULL AND expires_at <= $2
          AND user_id > $3
   )
 ORDER BY user_id
 LIMIT $4
   FOR UPDATE SKIP LOCKED
"""

_OLDEST_OPEN_OPERATION = """
SELECT min(opened_at) FROM operations WHERE merchant_id = $1 AND state = 'open'
"""

# Open operations opened at or before the cut-off, oldest first from `after`, claimed by
# locking their accounts.
_CLAIM_TIMED_OUT_OPERATIONS = """
SELECT o.opened_at, o.operation_id FROM operations o
  JOIN accounts a ON a.merchant_id = o.merchant_id AND a.user_id = o.user_id
 WHERE o.merchant_id = $1 AND o.state = 'open' AND o.opened_at <= $2
   AND (o.opened_at, o.operation_id) > ($3, $4)
 ORDER BY o.opened_at, o.operation_id
 LIMIT $5
   FOR UPDATE OF a SKIP LOCKED
"""

# Below every key, for the first claim of a walk.
_NO_USER = ""
_NO_INSTANT = datetime.min.replace(tzinfo=UTC)
_NO_OPERATION = UUID(int=0)


class ExpireLots:
    """Writes off the credits left in lots past their expiry, one user at a time."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def claim(
        self, conn: asyncpg.Connection, merchant_id: str, *, now: datetime, after: str | None, limit: int
    ) -> Sequence[str]:
        rows = await conn.fetch(
            _CLAIM_USERS_WITH_EXPIRED_LOTS, merchant_id, now, _NO_USER if after is None else after, limit
        )
        return [row["user_id"] for row in rows]

    async def handle(self, tx: Transaction, merchant_id: str, key: str, *, now: datetime) -> None:
        await self._ledger.expire_lots_of_user(tx, merchant_id, key)


@dataclass(frozen=True, order=True)
class DueOperation:
    """An open operation due for its timeout, in claim order."""

    opened_at: datetime
    operation_id: UUID
    operation_timeout: timedelta


class CloseTimedOutOperations:
    """Closes, without a debit, the operations left open past their merchant's timeout."""

    def __init__(self, ledger: Ledger, catalog: CatalogReader) -> None:
        self._ledger = ledger
        self._catalog = catalog

    async def claim(
        self,
        conn: asyncpg.Connection,
        merchant_id: str,
        *,
        now: datetime,
        after: DueOperation | None,
        limit: int,
    ) -> Sequence[DueOperation]:
        oldest: datetime | None = await conn.fetchval(_OLDEST_OPEN_OPERATION, merchant_id)
        if oldest is None or oldest > now - MIN_OPERATION_TIMEOUT:
            return []
        # Merchant terms are cached by the reader; while the catalog cannot say them and none
        # are cached, the merchant's operations wait for a later run.
        timeout = (await self._catalog.merchant_terms(merchant_id)).operation_timeout
        rows = await conn.fetch(
            _CLAIM_TIMED_OUT_OPERATIONS,
            merchant_id,
            now - timeout,
            _NO_INSTANT if after is None else after.opened_at,
            _NO_OPERATION if after is None else after.operation_id,
            limit,
        )
        return [DueOperation(row["opened_at"], row["operation_id"], timeout) for row in rows]

    async def handle(self, tx: Transaction, merchant_id: str, key: DueOperation, *, now: datetime) -> None:
        await self._ledger.time_out_operation(tx, merchant_id, key.operation_id, key.operation_timeout)


class LedgerJobs:
    """The ledger's periodic jobs; the app starts them after the directory and the relay and
    stops them before."""

    def __init__(
        self,
        databases: MerchantDatabases,
        ledger: Ledger,
        catalog: CatalogReader,
        relay: RelayNotifier,
        *,
        expiry_interval_seconds: float,
        timeout_interval_seconds: float,
        batch_size: int = 100,
        clock: Clock = utc_now,
        stop_grace_seconds: float = 10.0,
    ) -> None:
        def periodic(name: str, work: ClaimedWork[K], interval_seconds: float) -> PeriodicJob[K]:
            return PeriodicJob(
                name,
                work,
                databases,
                producer=PRODUCER,
                interval_seconds=interval_seconds,
                batch_size=batch_size,
                relay=relay,
                clock=clock,
                stop_grace_seconds=stop_grace_seconds,
            )

        self.expiry = periodic(LOT_EXPIRY, ExpireLots(ledger), expiry_interval_seconds)
        self.timeouts = periodic(
            OPERATION_TIMEOUT, CloseTimedOutOperations(ledger, catalog), timeout_interval_seconds
        )

    async def start(self) -> None:
        await self.expiry.start()
        await self.timeouts.start()

    async def stop(self) -> None:
        await self.expiry.stop()
        await self.timeouts.stop()
