"""Fixtures of the store tests, which run against the real PostgreSQL.

One database per test module, migrated like a merchant database (the kit's migrations,
then the catalog's); each test runs inside a transaction that is rolled back, so tests
never see each other's rows. Every database carries a prefix unique to the run and is
dropped at the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
from tally_catalog.settings import CatalogSettings
from tally_catalog.store import MIGRATIONS
from tally_kit.db.directory import quote_identifier
from tally_kit.db.migrations import KIT_MIGRATIONS, apply_migrations
from tally_kit.testing import drop_databases, unique_prefix

Connect = Callable[[], Awaitable[asyncpg.Connection]]


@pytest.fixture(scope="session")
async def store_settings() -> AsyncIterator[CatalogSettings]:
    settings = CatalogSettings(db_prefix=unique_prefix())
    yield settings
    await drop_databases(settings, settings.db_prefix)


async def _connect(settings: CatalogSettings, database: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_user,
        password=settings.pg_password.get_secret_value() or None,
        database=database,
    )


async def create_catalog_database(settings: CatalogSettings, name: str) -> Connect:
    """Creates and migrates a database; returns a function opening connections to it."""
    database = f"{settings.db_prefix}{name}"
    admin = await _connect(settings, "postgres")
    try:
        await admin.execute(f"CREATE DATABASE {quote_identifier(database)}")
    finally:
        await admin.close()
    conn = await _connect(settings, database)
    try:
        await apply_migrations(conn, [KIT_MIGRATIONS, MIGRATIONS])
    finally:
        await conn.close()
    return lambda: _connect(settings, database)


@pytest.fixture(scope="module")
async def connect(store_settings: CatalogSettings, request: pytest.FixtureRequest) -> Connect:
    return await create_catalog_database(
        store_settings, f"store_{request.module.__name__.rpartition('.')[2]}"
    )


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
