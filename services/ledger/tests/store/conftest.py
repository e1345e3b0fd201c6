"""Fixtures of the schema tests, which run against the real PostgreSQL.

One database per test module, migrated like a merchant database (the kit's migrations, then
the ledger's); each test runs inside a transaction that is rolled back, so tests never see
each other's rows. Every database carries a prefix unique to the run and is dropped at the
end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
import tally_ledger
from tally_kit.db.directory import quote_identifier
from tally_kit.db.migrations import KIT_MIGRATIONS, MigrationSource, apply_migrations
from tally_kit.settings import ServiceSettings
from tally_kit.testing import drop_databases, unique_prefix

Connect = Callable[[], Awaitable[asyncpg.Connection]]

LEDGER_MIGRATIONS = MigrationSource("ledger", Path(tally_ledger.__file__).resolve().parent / "migrations")


@pytest.fixture(scope="session")
async def schema_settings() -> AsyncIterator[ServiceSettings]:
    settings = ServiceSettings(db_prefix=unique_prefix())
    yield settings
    await drop_databases(settings, settings.db_prefix)


async def _connect(settings: ServiceSettings, database: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_user,
        password=settings.pg_password.get_secret_value() or None,
        database=database,
    )


@pytest.fixture(scope="module")
async def connect(schema_settings: ServiceSettings, request: pytest.FixtureRequest) -> Connect:
    """Creates and migrates the module's database; returns a function opening connections to it."""
    database = f"{schema_settings.db_prefix}ledger__{request.module.__name__.rpartition('.')[2]}"
    admin = await _connect(schema_settings, "postgres")
    try:
        await admin.execute(f"CREATE DATABASE {quote_identifier(database)}")
    finally:
        await admin.close()
    conn = await _connect(schema_settings, database)
    try:
        await apply_migrations(conn, [KIT_MIGRATIONS, LEDGER_MIGRATIONS])
    finally:
        await conn.close()
    return lambda: _connect(schema_settings, database)


@pytest.fixture
async def conn(connect: Connect) -> AsyncIterator[asyncpg.Connection]:
    """A connection inside a transaction rolled back after the test."""
    connection = await connect()
    transaction = connection.transaction()
    await transaction.start()
    try:
        yield connection
    finally:
        await transaction.rollback()
        await connection.close()
