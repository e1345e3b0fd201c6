"""Migrations against the real PostgreSQL: order, once under concurrency, immutable history."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from tally_kit.db.directory import quote_identifier
from tally_kit.db.migrations import MigrationError, MigrationSource, apply_migrations
from tally_kit.settings import ServiceSettings

pytestmark = pytest.mark.integration


def _connect_arguments(settings: ServiceSettings, database: str) -> dict[str, object]:
    return {
        "host": settings.pg_host,
        "port": settings.pg_port,
        "user": settings.pg_user,
        "password": settings.pg_password.get_secret_value() or None,
        "database": database,
    }


@pytest.fixture
async def database(kit_settings: ServiceSettings, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh, empty database for one test; dropped afterwards."""
    name = f"{kit_settings.db_prefix}migrations_{request.node.name[:30].lower()}"
    admin = await asyncpg.connect(**_connect_arguments(kit_settings, "postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {quote_identifier(name)}")
        yield name
        await admin.execute(f"DROP DATABASE {quote_identifier(name)} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def conn(kit_settings: ServiceSettings, database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(**_connect_arguments(kit_settings, database))
    yield connection
    await connection.close()


def _write(directory: Path, files: dict[str, str]) -> MigrationSource:
    directory.mkdir(exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return MigrationSource(directory.name, directory)


async def test_applies_pending_files_in_version_order_once(conn: asyncpg.Connection, tmp_path: Path) -> None:
    first = _write(
        tmp_path / "first",
        {
            "0002_add_note.sql": "ALTER TABLE things ADD COLUMN note text;",
            "0001_things.sql": "CREATE TABLE things (id int PRIMARY KEY);",
        },
    )
    second = _write(tmp_path / "second", {"0001_others.sql": "CREATE TABLE others (id int);"})

    applied = await apply_migrations(conn, [first, second])

    assert applied == ["first/0001_things.sql", "first/0002_add_note.sql", "second/0001_others.sql"]
    assert await apply_migrations(conn, [first, second]) == []
    rows = await conn.fetch(
        "SELECT component, version, name FROM schema_migrations ORDER BY component, version"
    )
    assert [(r["component"], r["version"], r["name"]) for r in rows] == [
        ("first", 1, "things"),
        ("first", 2, "add_note"),
        ("second", 1, "others"),
    ]
    await conn.execute("INSERT INTO things (id, note) VALUES (1, 'x')")


async def test_concurrent_processes_apply_each_file_once(
    kit_settings: ServiceSettings, database: str, tmp_path: Path
) -> None:
    # CREATE TABLE without IF NOT EXISTS fails if it runs twice, and the sleep keeps the
    # first applier inside its transaction while the others arrive.
    source = _write(
        tmp_path / "shop",
        {
            "0001_orders.sql": "CREATE TABLE orders (id int); SELECT pg_sleep(0.2);",
            "0002_lines.sql": "CREATE TABLE lines (id int);",
        },
    )
    connections = await asyncio.gather(
        *(asyncpg.connect(**_connect_arguments(kit_settings, database)) for _ in range(5))
    )
    try:
        results = await asyncio.gather(*(apply_migrations(c, [source]) for c in connections))
    finally:
        await asyncio.gather(*(c.close() for c in connections))

    assert sorted(results, key=len) == [[], [], [], [], ["shop/0001_orders.sql", "shop/0002_lines.sql"]]


async def test_refuses_a_file_changed_after_it_was_applied(conn: asyncpg.Connection, tmp_path: Path) -> None:
    source = _write(tmp_path / "shop", {"0001_orders.sql": "CREATE TABLE orders (id int);"})
    await apply_migrations(conn, [source])
    _write(tmp_path / "shop", {"0001_orders.sql": "CREATE TABLE orders (id bigint);"})

    with pytest.raises(MigrationError, match=r"shop/0001_orders\.sql was changed after it was applied"):
        await apply_migrations(conn, [source])


async def test_refuses_a_new_file_numbered_below_an_applied_one(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    source = _write(tmp_path / "shop", {"0002_orders.sql": "CREATE TABLE orders (id int);"})
    await apply_migrations(conn, [source])
    _write(tmp_path / "shop", {"0001_late.sql": "CREATE TABLE late (id int);"})

    with pytest.raises(MigrationError, match=r"shop/0001_late\.sql is numbered below version 2"):
        await apply_migrations(conn, [source])
    assert await conn.fetchval("SELECT to_regclass('late')") is None


async def test_refuses_misnamed_files_and_duplicate_versions(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    misnamed = _write(tmp_path / "misnamed", {"1_orders.sql": "SELECT 1;"})
    duplicated = _write(tmp_path / "duplicated", {"0001_a.sql": "SELECT 1;", "0001_b.sql": "SELECT 1;"})

    with pytest.raises(MigrationError, match=r"misnamed/1_orders\.sql: migration files are named"):
        await apply_migrations(conn, [misnamed])
    with pytest.raises(MigrationError, match="share version 1"):
        await apply_migrations(conn, [duplicated])


async def test_a_failing_file_is_not_recorded_and_stops_the_run(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    source = _write(
        tmp_path / "shop",
        {
            "0001_orders.sql": "CREATE TABLE orders (id int);",
            "0002_broken.sql": "CREATE TABLE broken (id int); SELECT * FROM missing_table;",
            "0003_after.sql": "CREATE TABLE after_broken (id int);",
        },
    )

    with pytest.raises(asyncpg.UndefinedTableError):
        await apply_migrations(conn, [source])

    versions = await conn.fetch("SELECT version FROM schema_migrations WHERE component = 'shop'")
    assert [r["version"] for r in versions] == [1]
    assert await conn.fetchval("SELECT to_regclass('broken')") is None
    assert await conn.fetchval("SELECT to_regclass('after_broken')") is None
