"""The merchant directory against the real PostgreSQL: provisioning, isolation, pools, ceiling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from asyncpg.connection import LoggedQuery
from prometheus_client import REGISTRY
from tally_kit.db import MerchantDirectory, MigrationSource, apply_migrations, merchant_database_name
from tally_kit.db.directory import quote_identifier
from tally_kit.db.migrations import KIT_MIGRATIONS, load_migrations
from tally_kit.db.pools import BoundedPools
from tally_kit.errors import InvalidArgument, NotFound, Unavailable
from tally_kit.settings import ServiceSettings

pytestmark = pytest.mark.integration


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.fixture(scope="module")
def shop_migrations(tmp_path_factory: pytest.TempPathFactory) -> MigrationSource:
    """A service's own merchant migrations."""
    directory = tmp_path_factory.mktemp("shop_migrations")
    (directory / "0001_notes.sql").write_text(
        "CREATE TABLE notes (merchant_id text NOT NULL, body text NOT NULL);"
    )
    return MigrationSource("shop", directory)


@pytest.fixture(scope="module")
async def directory(
    kit_settings: ServiceSettings, shop_migrations: MigrationSource
) -> AsyncIterator[MerchantDirectory]:
    directory = MerchantDirectory(kit_settings.model_copy(update={"service_name": "dir"}), [shop_migrations])
    await directory.start()
    yield directory
    await directory.close()


@pytest.fixture
async def admin(kit_settings: ServiceSettings) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the maintenance database, outside any directory."""
    conn = await asyncpg.connect(
        host=kit_settings.pg_host, port=kit_settings.pg_port, user=kit_settings.pg_user, database="postgres"
    )
    yield conn
    await conn.close()


def _expected_history(shop_migrations: MigrationSource) -> list[tuple[str, int]]:
    """(component, version) of every migration a merchant database gets: the kit's, then the service's."""
    migrations = [*load_migrations(KIT_MIGRATIONS), *load_migrations(shop_migrations)]
    return [(m.component, m.version) for m in migrations]


async def _database_exists(admin: asyncpg.Connection, name: str) -> bool:
    return bool(await admin.fetchval("SELECT true FROM pg_database WHERE datname = $1", name))


async def test_provision_creates_the_database_and_its_schema(
    directory: MerchantDirectory,
    kit_settings: ServiceSettings,
    shop_migrations: MigrationSource,
    admin: asyncpg.Connection,
) -> None:
    provisions_before = _sample("tally_merchant_provision_seconds_count")
    seconds_before = _sample("tally_merchant_provision_seconds_sum")

    placement = await directory.provision("acme")

    assert placement.merchant_id == "acme"
    assert placement.server == f"{kit_settings.pg_host}:{kit_settings.pg_port}"
    assert placement.database == f"{kit_settings.db_prefix}dir__m_acme"
    assert await _database_exists(admin, placement.database)
    assert await directory.is_provisioned("acme")
    assert "acme" in await directory.merchant_ids()
    async with directory.connection("acme") as conn:
        assert await conn.fetchval("SELECT current_database()") == placement.database
        applied = await conn.fetch("SELECT component, version FROM schema_migrations ORDER BY applied_at")
        assert [(r["component"], r["version"]) for r in applied] == _expected_history(shop_migrations)
        assert await conn.fetchval("SELECT to_regclass('idempotency_keys')") is not None
        assert await conn.fetchval("SELECT to_regclass('notes')") is not None
    assert await directory.provision("acme") == placement
    assert _sample("tally_merchant_provision_seconds_count") == provisions_before + 1
    elapsed = _sample("tally_merchant_provision_seconds_sum") - seconds_before
    print(f"provisioning one merchant database took {elapsed:.3f} s")


async def test_concurrent_first_provisions_create_one_database(directory: MerchantDirectory) -> None:
    provisions_before = _sample("tally_merchant_provision_seconds_count")

    placements = await asyncio.gather(*(directory.provision("burst") for _ in range(20)))

    assert len(set(placements)) == 1
    assert _sample("tally_merchant_provision_seconds_count") == provisions_before + 1


async def test_two_directories_racing_provision_one_database(
    kit_settings: ServiceSettings, shop_migrations: MigrationSource, admin: asyncpg.Connection
) -> None:
    # A service name of its own, so that both directories also race to create the control database.
    settings = kit_settings.model_copy(update={"service_name": "race"})
    first, second = (
        MerchantDirectory(settings, [shop_migrations]),
        MerchantDirectory(settings, [shop_migrations]),
    )
    await asyncio.gather(first.start(), second.start())
    try:
        placements = await asyncio.gather(
            *(d.provision("contested") for _ in range(10) for d in (first, second))
        )
        assert len(set(placements)) == 1
        async with first.control_connection() as conn:
            rows = await conn.fetch("SELECT status FROM merchant_databases WHERE merchant_id = 'contested'")
        assert [r["status"] for r in rows] == ["ready"]
        async with second.connection("contested") as conn:
            history = await conn.fetch("SELECT component, version FROM schema_migrations")
        assert sorted((r["component"], r["version"]) for r in history) == _expected_history(shop_migrations)
        assert await _database_exists(admin, placements[0].database)
    finally:
        await asyncio.gather(first.close(), second.close())


async def test_a_provisioning_cut_short_is_finished_by_the_next_call(
    directory: MerchantDirectory, kit_settings: ServiceSettings, admin: asyncpg.Connection
) -> None:
    # What a crash leaves: the row still `provisioning`, the database created, only the
    # kit's migrations applied.
    settings = kit_settings.model_copy(update={"service_name": "dir"})
    database = merchant_database_name(settings, "halfway")
    async with directory.control_connection() as conn:
        await conn.execute(
            "INSERT INTO merchant_databases (merchant_id, server, database, status) "
            "VALUES ('halfway', $1, $2, 'provisioning')",
            f"{settings.pg_host}:{settings.pg_port}",
            database,
        )
    await admin.execute(f"CREATE DATABASE {quote_identifier(database)}")
    crashed = await asyncpg.connect(
        host=settings.pg_host, port=settings.pg_port, user="postgres", database=database
    )
    try:
        await apply_migrations(crashed, [KIT_MIGRATIONS])
    finally:
        await crashed.close()
    assert not await directory.is_provisioned("halfway")

    placement = await directory.provision("halfway")

    assert placement.database == database
    assert await directory.is_provisioned("halfway")
    async with directory.connection("halfway") as conn:
        assert await conn.fetchval("SELECT to_regclass('notes')") is not None


async def test_an_unknown_merchant_is_not_found(directory: MerchantDirectory) -> None:
    for merchant_id in ("nobody", "Not-Valid!"):
        with pytest.raises(NotFound) as raised:
            async with directory.connection(merchant_id):
                pass
        assert raised.value.reason == "MERCHANT_NOT_FOUND"
        assert raised.value.message == f"merchant '{merchant_id}' not found"
        with pytest.raises(NotFound):
            async with directory.transaction(merchant_id):
                pass
        assert not await directory.is_provisioned(merchant_id)
    with pytest.raises(InvalidArgument):
        await directory.provision("Not-Valid!")


async def test_a_merchants_rows_are_only_in_its_own_database(
    directory: MerchantDirectory, kit_settings: ServiceSettings
) -> None:
    await asyncio.gather(directory.provision("alpha"), directory.provision("bravo"))

    async with directory.transaction("alpha") as conn:
        await conn.execute("INSERT INTO notes (merchant_id, body) VALUES ('alpha', 'secret of alpha')")

    async with directory.connection("alpha") as conn:
        assert await conn.fetchval("SELECT count(*) FROM notes") == 1
    async with directory.connection("bravo") as conn:
        assert await conn.fetchval("SELECT count(*) FROM notes") == 0
        assert await conn.fetchval("SELECT current_database()") == f"{kit_settings.db_prefix}dir__m_bravo"


async def test_transactions_roll_back_on_error_and_take_an_isolation_level(
    directory: MerchantDirectory,
) -> None:
    await directory.provision("acme")

    with pytest.raises(RuntimeError, match="effect failed"):
        async with directory.transaction("acme") as conn:
            await conn.execute("INSERT INTO notes (merchant_id, body) VALUES ('acme', 'rolled back')")
            raise RuntimeError("effect failed")

    async with directory.transaction("acme") as conn:
        assert await conn.fetchval("SELECT count(*) FROM notes WHERE body = 'rolled back'") == 0
        assert await conn.fetchval("SHOW transaction_isolation") == "read committed"
    async with directory.transaction("acme", isolation="serializable") as conn:
        assert await conn.fetchval("SHOW transaction_isolation") == "serializable"


async def test_pools_are_evicted_lru_and_connections_stay_under_the_ceiling(
    kit_settings: ServiceSettings, admin: asyncpg.Connection
) -> None:
    settings = kit_settings.model_copy(
        update={"service_name": "pools", "db_max_pools": 2, "db_pool_max_size": 3, "db_max_connections": 4}
    )
    merchants = [f"shop-{n}" for n in range(5)]
    ceilings_before = _sample("tally_db_connections_max")
    directory = MerchantDirectory(settings)
    assert _sample("tally_db_connections_max") == ceilings_before + 4
    await directory.start()
    try:
        for merchant_id in merchants:
            await directory.provision(merchant_id)
        evictions_before = _sample("tally_db_pool_evictions_total")
        observed: list[int] = []
        running = True

        async def sample_server_connections() -> None:
            while running:
                observed.append(
                    await admin.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE starts_with(datname, $1)",
                        f"{settings.db_prefix}pools__",
                    )
                )
                await asyncio.sleep(0.005)

        async def work(merchant_id: str) -> None:
            for _ in range(4):
                async with directory.transaction(merchant_id) as conn:
                    database = await conn.fetchval("SELECT current_database()")
                    await conn.execute("SELECT pg_sleep(0.02)")
                assert database == f"{settings.db_prefix}pools__m_{merchant_id}"

        sampler = asyncio.create_task(sample_server_connections())
        started = time.perf_counter()
        await asyncio.gather(*(work(m) for m in merchants for _ in range(3)))
        running = False
        await sampler
        print(
            f"60 transactions over 5 merchants in {time.perf_counter() - started:.2f} s, "
            f"at most {max(observed)} server connections (ceiling 4)"
        )

        assert max(observed) <= settings.db_max_connections
        assert max(observed) >= 2  # the merchants really did run at the same time
        assert _sample("tally_db_pool_evictions_total") - evictions_before >= 3
    finally:
        await directory.close()
    assert _sample("tally_db_connections_max") == ceilings_before


async def test_an_evicted_pool_closes_only_after_its_connections_are_released(
    kit_settings: ServiceSettings, admin: asyncpg.Connection
) -> None:
    settings = kit_settings.model_copy(update={"service_name": "evict", "db_max_pools": 1})
    directory = MerchantDirectory(settings)
    await directory.start()
    try:
        await directory.provision("first")
        await directory.provision("second")
        count_first = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
            f"{settings.db_prefix}evict__m_first",
        )
        async with directory.connection("first") as held:
            async with directory.connection("second") as other:
                assert await other.fetchval("SELECT 1") == 1
            # The pool of "first" was evicted to make room, yet its borrowed connection works.
            assert await held.fetchval("SELECT current_database()") == f"{settings.db_prefix}evict__m_first"
            assert await admin.fetchval(*count_first) == 1

        # Released, the connection goes with its pool; give the background close a moment.
        for _ in range(100):
            if await admin.fetchval(*count_first) == 0:
                break
            await asyncio.sleep(0.02)
        assert await admin.fetchval(*count_first) == 0
    finally:
        await directory.close()


async def test_a_caller_waits_for_a_connection_only_so_long(kit_settings: ServiceSettings) -> None:
    settings = kit_settings.model_copy(update={"service_name": "ceiling", "db_max_connections": 2})
    setup = MerchantDirectory(settings)
    await setup.start()
    try:
        await asyncio.gather(setup.provision("busy"), setup.provision("starved"))
    finally:
        await setup.close()

    # Ceiling 2: the control pool's connection and one more.
    directory = MerchantDirectory(settings.model_copy(update={"db_command_timeout_seconds": 0.5}))
    await directory.start()
    try:
        async with directory.connection("busy") as held:
            started = time.perf_counter()
            with pytest.raises(Unavailable) as raised:
                async with directory.connection("starved"):
                    pass
            waited = time.perf_counter() - started
            assert raised.value.reason == "DB_CONNECTIONS_EXHAUSTED"
            assert 0.4 <= waited < 2.0
            assert await held.fetchval("SELECT 1") == 1
        async with directory.connection("starved") as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await directory.close()


def test_database_names_must_fit_postgres_identifiers(kit_settings: ServiceSettings) -> None:
    with pytest.raises(ValueError, match="too long"):
        MerchantDirectory(kit_settings.model_copy(update={"service_name": "a-very-long-service-name"}))


async def test_migrate_all_brings_every_merchant_database_up_to_date(
    kit_settings: ServiceSettings, tmp_path: Path
) -> None:
    shop = tmp_path / "shop"
    shop.mkdir()
    (shop / "0001_notes.sql").write_text(
        "CREATE TABLE notes (merchant_id text NOT NULL, body text NOT NULL);"
    )
    settings = kit_settings.model_copy(update={"service_name": "upgrade"})
    before = MerchantDirectory(settings, [MigrationSource("shop", shop)])
    await before.start()
    try:
        await asyncio.gather(before.provision("old-one"), before.provision("old-two"))
    finally:
        await before.close()

    # The next release of the service ships a new migration.
    (shop / "0002_tags.sql").write_text("ALTER TABLE notes ADD COLUMN tags text[] NOT NULL DEFAULT '{}';")
    after = MerchantDirectory(settings, [MigrationSource("shop", shop)])
    await after.start()
    try:
        assert await after.migrate_all() == {
            "old-one": ["shop/0002_tags.sql"],
            "old-two": ["shop/0002_tags.sql"],
        }
        assert await after.migrate_all() == {"old-one": [], "old-two": []}
        async with after.connection("old-two") as conn:
            await conn.execute("INSERT INTO notes (merchant_id, body, tags) VALUES ('old-two', 'x', '{a}')")
    finally:
        await after.close()


async def test_a_connection_goes_back_to_its_pool_without_a_round_trip(kit_settings: ServiceSettings) -> None:
    settings = kit_settings.model_copy(update={"service_name": "noreset", "db_pool_max_size": 1})
    directory = MerchantDirectory(settings)
    await directory.start()
    try:
        await directory.provision("quiet")
        sent: list[str] = []

        def record(query: LoggedQuery) -> None:
            sent.append(query.query)

        async with directory.connection("quiet") as conn:
            conn.add_query_logger(record)
            backend = await conn.fetchval("SELECT pg_backend_pid()")
        async with directory.transaction("quiet") as conn:
            await conn.execute("SET LOCAL statement_timeout = '5s'")
        async with directory.connection("quiet") as conn:
            # One connection in the pool, and what the transaction set ended with it.
            assert await conn.fetchval("SHOW statement_timeout") == "0"
            conn.remove_query_logger(record)
        # Every statement the connection ran is here: none is a reset.
        assert sent[0] == "SELECT pg_backend_pid()"
        assert sent[1].startswith("BEGIN")
        assert sent[2:] == ["SET LOCAL statement_timeout = '5s'", "COMMIT;", "SHOW statement_timeout"]
        async with directory.connection("quiet") as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == backend
    finally:
        await directory.close()


async def test_a_connection_whose_session_changed_is_reset_before_reuse(
    kit_settings: ServiceSettings,
) -> None:
    settings = kit_settings.model_copy(update={"service_name": "dirty"})
    directory = MerchantDirectory(settings)
    await directory.start()
    pools = BoundedPools(
        user=settings.pg_user,
        password=None,
        application_name="dirty",
        max_pools=1,
        pool_max_size=1,
        max_connections=1,
        acquire_timeout=5.0,
        command_timeout=5.0,
        idle_connection_seconds=60.0,
    )
    try:
        address = (await directory.provision("dirty")).address
        async with pools.connection(address, changes_session=True) as conn:
            backend = await conn.fetchval("SELECT pg_backend_pid()")
            await conn.execute("SELECT pg_advisory_lock(42)")
            await conn.execute("SET statement_timeout = '7s'")
        async with pools.connection(address) as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == backend
            assert await conn.fetchval("SHOW statement_timeout") == "0"
            held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            assert await conn.fetchval(held) == 0
    finally:
        await pools.close()
        await directory.close()


async def test_a_caller_waits_for_a_busy_pool_only_so_long_and_gets_a_released_connection(
    kit_settings: ServiceSettings,
) -> None:
    settings = kit_settings.model_copy(
        update={"service_name": "busy", "db_pool_max_size": 1, "db_command_timeout_seconds": 0.5}
    )
    directory = MerchantDirectory(settings)
    await directory.start()
    try:
        await directory.provision("single")
        async with directory.connection("single") as held:
            started = time.perf_counter()
            with pytest.raises(Unavailable) as raised:
                async with directory.connection("single"):
                    pass
            assert raised.value.reason == "DB_CONNECTIONS_EXHAUSTED"
            assert 0.4 <= time.perf_counter() - started < 2.0
            backend = await held.fetchval("SELECT pg_backend_pid()")

        async def wait_then_use() -> int:
            async with directory.connection("single") as conn:
                return await conn.fetchval("SELECT pg_backend_pid()")

        async with directory.connection("single"):
            waiter = asyncio.create_task(wait_then_use())
            await asyncio.sleep(0.1)
            assert not waiter.done()
        assert await waiter == backend
    finally:
        await directory.close()
