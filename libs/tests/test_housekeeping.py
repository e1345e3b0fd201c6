"""Housekeeping against the real PostgreSQL: the kit's rows past their retention are deleted in
batches in every merchant database; rows still in use or within retention are kept."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
from prometheus_client import REGISTRY
from tally_kit.db import MerchantDirectory
from tally_kit.housekeeping import Housekeeping
from tally_kit.settings import ServiceSettings

pytestmark = pytest.mark.integration

MERCHANTS = ("tidy-acme", "tidy-globex")
TABLES = ("outbox", "inbox", "idempotency_keys")


@pytest.fixture(scope="module")
async def directory(kit_settings: ServiceSettings) -> AsyncIterator[MerchantDirectory]:
    directory = MerchantDirectory(kit_settings.model_copy(update={"service_name": "tidy"}))
    await directory.start()
    for merchant_id in MERCHANTS:
        await directory.provision(merchant_id)
    yield directory
    await directory.close()


@pytest.fixture(autouse=True)
async def empty_tables(directory: MerchantDirectory) -> None:
    for merchant_id in MERCHANTS:
        async with directory.transaction(merchant_id) as conn:
            await conn.execute("TRUNCATE outbox, inbox, idempotency_keys")


def housekeeping(
    directory: MerchantDirectory, kit_settings: ServiceSettings, batch_size: int
) -> Housekeeping:
    settings = kit_settings.model_copy(
        update={
            "housekeeping_batch_size": batch_size,
            "outbox_retention_days": 7.0,
            "inbox_retention_days": 30.0,
            "idempotency_retention_days": 30.0,
        }
    )
    return Housekeeping(settings, directory)


async def add_rows(conn: asyncpg.Connection, merchant_id: str, count: int, *, age_days: float) -> None:
    """`count` rows in each table, stamped `age_days` ago; the outbox rows published then."""
    age = timedelta(days=age_days)
    for _ in range(count):
        await conn.execute(
            "INSERT INTO outbox (event_id, event_type, merchant_id, envelope, created_at, published_at)"
            " VALUES ($1, 'test.happened', $2, '\\x00', now() - $3::interval, now() - $3::interval)",
            uuid.uuid4(),
            merchant_id,
            age,
        )
        await conn.execute(
            "INSERT INTO inbox (event_id, merchant_id, consumer, event_type, handled_at)"
            " VALUES ($1, $2, 'tidy', 'test.happened', now() - $3::interval)",
            uuid.uuid4(),
            merchant_id,
            age,
        )
        await conn.execute(
            "INSERT INTO idempotency_keys (request_id, operation, fingerprint, response, created_at)"
            " VALUES ($1, 'Test', 'f', '\\x00', now() - $2::interval)",
            str(uuid.uuid4()),
            age,
        )


async def counts(directory: MerchantDirectory, merchant_id: str) -> dict[str, int]:
    async with directory.connection(merchant_id) as conn:
        return {table: await conn.fetchval(f"SELECT count(*) FROM {table}") for table in TABLES}


def deleted_sample(table: str) -> float:
    return REGISTRY.get_sample_value("tally_housekeeping_rows_deleted_total", {"table": table}) or 0.0


async def test_rows_past_their_retention_are_deleted_in_batches_in_every_merchant_database(
    directory: MerchantDirectory, kit_settings: ServiceSettings
) -> None:
    for merchant_id in MERCHANTS:
        async with directory.transaction(merchant_id) as conn:
            await add_rows(conn, merchant_id, 7, age_days=45)  # past every retention
            await add_rows(conn, merchant_id, 2, age_days=10)  # outbox rows only
            await add_rows(conn, merchant_id, 3, age_days=1)  # within every retention
            # An event not yet published is kept however old.
            await conn.execute(
                "INSERT INTO outbox (event_id, event_type, merchant_id, envelope, created_at)"
                " VALUES ($1, 'test.happened', $2, '\\x00', now() - interval '90 days')",
                uuid.uuid4(),
                merchant_id,
            )
    before = {table: deleted_sample(table) for table in TABLES}

    deleted = await housekeeping(directory, kit_settings, batch_size=3).run_once()

    assert deleted == {"outbox": 2 * 9, "inbox": 2 * 7, "idempotency_keys": 2 * 7}
    for merchant_id in MERCHANTS:
        assert await counts(directory, merchant_id) == {"outbox": 4, "inbox": 5, "idempotency_keys": 5}
        async with directory.connection(merchant_id) as conn:
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 1
    assert {table: deleted_sample(table) - before[table] for table in TABLES} == deleted

    assert await housekeeping(directory, kit_settings, batch_size=3).run_once() == dict.fromkeys(TABLES, 0)


async def test_rows_locked_by_a_transaction_in_flight_are_left_for_the_next_run(
    directory: MerchantDirectory, kit_settings: ServiceSettings
) -> None:
    merchant_id = MERCHANTS[0]
    async with directory.transaction(merchant_id) as conn:
        await add_rows(conn, merchant_id, 4, age_days=45)
    async with directory.transaction(merchant_id) as holder:
        await holder.execute("SELECT 1 FROM inbox ORDER BY handled_at LIMIT 1 FOR UPDATE")
        deleted = await housekeeping(directory, kit_settings, batch_size=10).run_once()
        assert deleted == {"outbox": 4, "inbox": 3, "idempotency_keys": 4}
    assert (await housekeeping(directory, kit_settings, batch_size=10).run_once())["inbox"] == 1


async def test_two_replicas_at_once_share_the_work(
    directory: MerchantDirectory, kit_settings: ServiceSettings
) -> None:
    for merchant_id in MERCHANTS:
        async with directory.transaction(merchant_id) as conn:
            await add_rows(conn, merchant_id, 40, age_days=45)
    first, second = await asyncio.gather(
        housekeeping(directory, kit_settings, batch_size=5).run_once(),
        housekeeping(directory, kit_settings, batch_size=5).run_once(),
    )
    assert {table: first[table] + second[table] for table in TABLES} == dict.fromkeys(TABLES, 80)
    for merchant_id in MERCHANTS:
        assert await counts(directory, merchant_id) == dict.fromkeys(TABLES, 0)


async def test_start_runs_at_once_and_stop_ends_the_loop(
    directory: MerchantDirectory, kit_settings: ServiceSettings
) -> None:
    merchant_id = MERCHANTS[1]
    async with directory.transaction(merchant_id) as conn:
        await add_rows(conn, merchant_id, 2, age_days=45)
    job = housekeeping(directory, kit_settings, batch_size=10)
    await job.start()
    try:
        for _ in range(100):
            if await counts(directory, merchant_id) == dict.fromkeys(TABLES, 0):
                break
            await asyncio.sleep(0.05)
        assert await counts(directory, merchant_id) == dict.fromkeys(TABLES, 0)
    finally:
        await asyncio.wait_for(job.stop(), 5)
