"""The ledger's periodic jobs on the real PostgreSQL beside the real catalog: lot expiry
(partly used lots, concurrent runners, racing debits) and operation timeouts."""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from catalog_harness import RunningCatalog
from ledger_support import (
    MovingClock,
    OnlyMerchants,
    books_disagreements,
    in_transaction,
    lot_books,
    settle,
)
from prometheus_client import REGISTRY
from tally_kit.db import MerchantDirectory
from tally_kit.errors import FailedPrecondition
from tally_ledger.catalog_client import GrpcCatalogReader
from tally_ledger.domain import Operation, OperationState
from tally_ledger.jobs import LOT_EXPIRY, OPERATION_TIMEOUT, LedgerJobs
from tally_ledger.services import Ledger

pytestmark = pytest.mark.integration


class RecordingRelay:
    def __init__(self) -> None:
        self.notified: list[str] = []

    def notify(self, merchant_id: str) -> None:
        self.notified.append(merchant_id)


def new_user() -> str:
    return f"user-{secrets.token_hex(4)}"


def ledger_jobs(
    directory: MerchantDirectory,
    merchant_id: str,
    ledger: Ledger,
    reader: GrpcCatalogReader,
    clock: MovingClock,
    relay: RecordingRelay | None = None,
    batch_size: int = 100,
) -> LedgerJobs:
    return LedgerJobs(
        OnlyMerchants(directory, [merchant_id]),
        ledger,
        reader,
        relay or RecordingRelay(),
        expiry_interval_seconds=60,
        timeout_interval_seconds=60,
        batch_size=batch_size,
        clock=clock,
    )


async def consume(
    ledger: Ledger, directory: MerchantDirectory, merchant_id: str, user_id: str, calls: int
) -> None:
    """Opens an `api.calls` operation for the user and records `calls` calls (a credit each)."""
    operation = await in_transaction(
        directory, merchant_id, lambda tx: ledger.open_operation(tx, merchant_id, user_id, "api.calls", None)
    )
    await in_transaction(
        directory,
        merchant_id,
        lambda tx: ledger.record_and_close(tx, merchant_id, operation.operation_id, Decimal(calls)),
    )


async def entry_kinds(
    directory: MerchantDirectory, merchant_id: str, user_id: str
) -> list[tuple[str, Decimal]]:
    async with directory.connection(merchant_id) as conn:
        rows = await conn.fetch(
            "SELECT kind, amount FROM entries WHERE merchant_id = $1 AND user_id = $2 ORDER BY entry_seq",
            merchant_id,
            user_id,
        )
    return [(row["kind"], row["amount"]) for row in rows]


async def test_expiry_of_a_partly_used_lot_writes_one_entry_for_the_credits_left(
    jobs_catalog: RunningCatalog,
    jobs_directory: MerchantDirectory,
    jobs_reader: GrpcCatalogReader,
    ledger: Ledger,
    clock: MovingClock,
    merchant_id: str,
) -> None:
    product = await jobs_catalog.create_product(merchant_id, credits="100", access_period_days=1)
    user_id = new_user()
    await settle(ledger, jobs_directory, merchant_id, user_id, product.product_id)
    await consume(ledger, jobs_directory, merchant_id, user_id, 30)
    relay = RecordingRelay()
    jobs = ledger_jobs(jobs_directory, merchant_id, ledger, jobs_reader, clock, relay)

    assert (await jobs.expiry.run_once()).items == 0, "nothing is due before the expiry"
    clock.advance(timedelta(days=1, seconds=1))
    run = await jobs.expiry.run_once()

    assert (run.merchants, run.items, run.failures) == (1, 1, 0)
    assert await entry_kinds(jobs_directory, merchant_id, user_id) == [
        ("lot_issued", Decimal(100)),
        ("debit", Decimal(-30)),
        ("expiry", Decimal(-70)),
    ]
    (lot,) = (await lot_books(jobs_directory, merchant_id)).values()
    assert (lot.remaining, lot.consumed, lot.expired) == (0, 30, 70)
    assert relay.notified == [merchant_id], "the lot_expired event is published after the commit"
    async with jobs_directory.connection(merchant_id) as conn:
        published = await conn.fetchval("SELECT count(*) FROM outbox WHERE event_type = 'ledger.lot_expired'")
    assert published == 1

    assert (await jobs.expiry.run_once()).items == 0, "an expired lot is never expired again"
    assert await books_disagreements(jobs_directory, merchant_id) == []


async def test_two_runners_at_once_expire_each_lot_once(
    jobs_catalog: RunningCatalog,
    jobs_directory: MerchantDirectory,
    jobs_reader: GrpcCatalogReader,
    ledger: Ledger,
    clock: MovingClock,
    merchant_id: str,
) -> None:
    expiring = await jobs_catalog.create_product(merchant_id, credits="10", access_period_days=1)
    lasting = await jobs_catalog.create_product(merchant_id, credits="5")
    users = [new_user() for _ in range(25)]
    for user_id in users:
        await settle(ledger, jobs_directory, merchant_id, user_id, expiring.product_id)
        await settle(ledger, jobs_directory, merchant_id, user_id, lasting.product_id)
    clock.advance(timedelta(days=2))
    # Small batches, so that the two runners interleave over many claims.
    first = ledger_jobs(jobs_directory, merchant_id, ledger, jobs_reader, clock, batch_size=4)
    second = ledger_jobs(jobs_directory, merchant_id, ledger, jobs_reader, clock, batch_size=4)

    runs = await asyncio.gather(first.expiry.run_once(), second.expiry.run_once())

    assert sum(run.items for run in runs) == len(users)
    lots = (await lot_books(jobs_directory, merchant_id)).values()
    assert sorted(lot.expiry_entries for lot in lots) == [0] * len(users) + [1] * len(users)
    assert all(lot.remaining == (5 if lot.expires_at is None else 0) for lot in lots)
    assert await books_disagreements(jobs_directory, merchant_id) == []


async def test_an_operation_left_open_past_the_timeout_is_closed(
    jobs_catalog: RunningCatalog,
    jobs_directory: MerchantDirectory,
    jobs_reader: GrpcCatalogReader,
    ledger: Ledger,
    clock: MovingClock,
    merchant_id: str,
) -> None:
    """The merchant's operation timeout is 15 minutes."""
    product = await jobs_catalog.create_product(merchant_id, credits="100")
    stale_user, fresh_user = new_user(), new_user()
    for user_id in (stale_user, fresh_user):
        await settle(ledger, jobs_directory, merchant_id, user_id, product.product_id)

    def open_for(user_id: str) -> Awaitable[Operation]:
        return in_transaction(
            jobs_directory,
            merchant_id,
            lambda tx: ledger.open_operation(tx, merchant_id, user_id, "api.calls", "wf-1"),
        )

    stale = await open_for(stale_user)
    clock.advance(timedelta(minutes=10))
    fresh = await open_for(fresh_user)
    jobs = ledger_jobs(jobs_directory, merchant_id, ledger, jobs_reader, clock)
    assert (await jobs.timeouts.run_once()).items == 0, "nothing is past 15 minutes yet"

    clock.advance(timedelta(minutes=5, seconds=1))
    run = await jobs.timeouts.run_once()

    assert (run.items, run.failures) == (1, 0)
    async with jobs_directory.connection(merchant_id) as conn:
        states = dict(
            await conn.fetch(
                "SELECT operation_id, state FROM operations WHERE operation_id = ANY($1::uuid[])",
                [stale.operation_id, fresh.operation_id],
            )
        )
    assert states == {stale.operation_id: OperationState.TIMED_OUT.value, fresh.operation_id: "open"}
    with pytest.raises(FailedPrecondition) as refused:
        await in_transaction(
            jobs_directory,
            merchant_id,
            lambda tx: ledger.record_and_close(tx, merchant_id, stale.operation_id, Decimal(3)),
        )
    assert refused.value.reason == "OPERATION_NOT_OPEN"
    assert (await jobs.timeouts.run_once()).items == 0, "a timed-out operation is not timed out again"
    # The operation still open is recorded as usual.
    await in_transaction(
        jobs_directory,
        merchant_id,
        lambda tx: ledger.record_and_close(tx, merchant_id, fresh.operation_id, Decimal(3)),
    )
    assert await books_disagreements(jobs_directory, merchant_id) == []


@dataclass(frozen=True)
class Race:
    """One round: users whose lots expire at known instants, each with an operation open."""

    expiries: dict[str, datetime]
    operations: dict[str, Operation]


async def prepare_race(
    ledger: Ledger, directory: MerchantDirectory, clock: MovingClock, merchant_id: str, product_id: str
) -> Race:
    users = [new_user() for _ in range(12)]
    race_start = clock() + timedelta(seconds=1.5)
    expiries: dict[str, datetime] = {}
    for index, user_id in enumerate(users):
        expiries[user_id] = race_start + timedelta(milliseconds=40 * index)
        # Issued a day before it should expire, so that it expires at that instant.
        clock.pinned = expiries[user_id] - timedelta(days=1)
        await settle(ledger, directory, merchant_id, user_id, product_id)
    clock.pinned = None
    operations: dict[str, Operation] = {}
    for user_id in users:
        operations[user_id] = await in_transaction(
            directory,
            merchant_id,
            lambda tx, user_id=user_id: ledger.open_operation(tx, merchant_id, user_id, "api.calls", None),
        )
    return Race(expiries, operations)


async def run_race(
    race: Race,
    ledger: Ledger,
    directory: MerchantDirectory,
    clock: MovingClock,
    merchant_id: str,
    runners: list[LedgerJobs],
) -> None:
    """Each user's debit of 4 credits lands up to 150 ms either side of their lot's expiry,
    while the runners expire lots over and over."""

    async def debit_near_expiry(user_id: str) -> None:
        lead = race.expiries[user_id] + timedelta(milliseconds=random.uniform(-150, 150)) - clock()
        await asyncio.sleep(max(lead.total_seconds(), 0))
        operation_id = race.operations[user_id].operation_id
        await in_transaction(
            directory,
            merchant_id,
            lambda tx: ledger.record_and_close(tx, merchant_id, operation_id, Decimal(4)),
        )

    race_end = max(race.expiries.values()) + timedelta(milliseconds=300)

    async def expire_repeatedly(jobs: LedgerJobs) -> None:
        while clock() < race_end:
            await jobs.expiry.run_once()
            await asyncio.sleep(0.01)

    await asyncio.gather(
        *(debit_near_expiry(user_id) for user_id in race.expiries),
        *(expire_repeatedly(jobs) for jobs in runners),
    )
    # What a runner skipped while a debit held its account.
    await runners[0].expiry.run_once()


async def test_expiry_and_debits_racing_for_the_same_lots_never_use_a_credit_twice(
    jobs_catalog: RunningCatalog,
    jobs_directory: MerchantDirectory,
    jobs_reader: GrpcCatalogReader,
    ledger: Ledger,
    clock: MovingClock,
    merchant_id: str,
) -> None:
    """Each user has one 10-credit lot expiring at a real instant; a debit of 4 credits and two
    expiry runners race around that instant, three rounds of twelve users. Whichever comes
    first wins each credit: 4 consumed and 6 expired, or 10 expired and the debit owed."""
    product = await jobs_catalog.create_product(merchant_id, credits="10", access_period_days=1)
    runners = [
        ledger_jobs(jobs_directory, merchant_id, ledger, jobs_reader, clock, batch_size=3) for _ in range(2)
    ]
    outcomes = {"debit_first": 0, "expiry_first": 0}

    for _ in range(3):
        race = await prepare_race(ledger, jobs_directory, clock, merchant_id, product.product_id)
        await run_race(race, ledger, jobs_directory, clock, merchant_id, runners)

        lots = {lot.user_id: lot for lot in (await lot_books(jobs_directory, merchant_id)).values()}
        for user_id in race.expiries:
            lot = lots[user_id]
            assert lot.remaining == 0 and lot.expiry_entries <= 1 and lot.consumed_after_expiry == 0, lot
            assert (lot.consumed, lot.expired) in {(4, 6), (0, 10)}, lot
            outcomes["debit_first" if lot.consumed else "expiry_first"] += 1
        assert await books_disagreements(jobs_directory, merchant_id) == []

    # Debits spread 150 ms either side of each expiry: both orders happen.
    assert outcomes["debit_first"] and outcomes["expiry_first"], outcomes


async def test_job_metrics_and_names(
    jobs_directory: MerchantDirectory,
    jobs_reader: GrpcCatalogReader,
    ledger: Ledger,
    clock: MovingClock,
    merchant_id: str,
) -> None:
    jobs = ledger_jobs(jobs_directory, merchant_id, ledger, jobs_reader, clock)
    assert (jobs.expiry.name, jobs.timeouts.name) == (LOT_EXPIRY, OPERATION_TIMEOUT)
    before = (
        REGISTRY.get_sample_value("tally_job_runs_total", {"job": OPERATION_TIMEOUT, "outcome": "ok"}) or 0
    )
    await jobs.timeouts.run_once()
    after = REGISTRY.get_sample_value("tally_job_runs_total", {"job": OPERATION_TIMEOUT, "outcome": "ok"})
    assert after == before + 1
    assert REGISTRY.get_sample_value("tally_job_duration_seconds_count", {"job": OPERATION_TIMEOUT})


async def test_jobs_start_and_stop_with_the_app(
    jobs_catalog: RunningCatalog,
    jobs_directory: MerchantDirectory,
    jobs_reader: GrpcCatalogReader,
    ledger: Ledger,
    clock: MovingClock,
    merchant_id: str,
) -> None:
    product = await jobs_catalog.create_product(merchant_id, credits="10", access_period_days=1)
    user_id = new_user()
    await settle(ledger, jobs_directory, merchant_id, user_id, product.product_id)
    clock.advance(timedelta(days=1, seconds=1))
    jobs = LedgerJobs(
        OnlyMerchants(jobs_directory, [merchant_id]),
        ledger,
        jobs_reader,
        RecordingRelay(),
        expiry_interval_seconds=0.1,
        timeout_interval_seconds=0.1,
        clock=clock,
    )
    await jobs.start()
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while (await entry_kinds(jobs_directory, merchant_id, user_id))[-1][0] != "expiry":
            assert asyncio.get_running_loop().time() < deadline, "the started job never expired the lot"
            await asyncio.sleep(0.05)
    finally:
        await asyncio.wait_for(jobs.stop(), timeout=5)
