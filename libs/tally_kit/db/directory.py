"""The merchant directory: each merchant's data in a database of its own, per service.

A service has one control database, `<prefix><service>__control`, whose
`merchant_databases` table says on which server each merchant's database
(`<prefix><service>__m_<merchant>`) lives. New merchants are placed on the server in the
settings; recording the server per merchant lets merchants live on other servers later
with no change to service code.

Provisioning is idempotent and safe to race, within a process and across processes: the
placement row is claimed with an insert that does nothing on conflict, CREATE DATABASE
treats "already exists" as done, and migrations run under their advisory lock. The row
turns `ready` only after the migrations, so a provisioning cut short is completed by the
next call. Placements of ready merchants are cached in memory: using a known merchant
costs no control-database query.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import asyncpg
from prometheus_client import Histogram

from tally_kit.db.migrations import KIT_MIGRATIONS, MigrationSource, apply_migrations
from tally_kit.db.pools import BoundedPools, DatabaseAddress, server_address
from tally_kit.errors import NotFound, Violations
from tally_kit.ids import MERCHANT_ID_PATTERN, is_valid_merchant_id
from tally_kit.settings import ServiceSettings

log = logging.getLogger(__name__)

CONTROL_MIGRATIONS = MigrationSource("control", Path(__file__).resolve().parent / "control_migrations")

IsolationLevel = Literal["read_committed", "repeatable_read", "serializable"]

# The control database sees little traffic. One connection also guarantees that the
# smallest allowed ceiling (2) always leaves a slot for merchant databases.
_CONTROL_POOL_MAX_SIZE = 1
# CREATE DATABASE is issued from the server's maintenance database.
_MAINTENANCE_DATABASE = "postgres"
# PostgreSQL truncates longer identifiers, which would make distinct names collide.
_MAX_IDENTIFIER_BYTES = 63
_LONGEST_MERCHANT_ID = "m" * 32

PROVISION_SECONDS = Histogram(
    "tally_merchant_provision_seconds",
    "Time to create and migrate a merchant's database",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


def control_database_name(settings: ServiceSettings) -> str:
    return f"{settings.db_prefix}{settings.service_name}__control"


def merchant_database_name(settings: ServiceSettings, merchant_id: str) -> str:
    if not is_valid_merchant_id(merchant_id):
        raise ValueError(f"invalid merchant id {merchant_id!r}")
    return f"{settings.db_prefix}{settings.service_name}__m_{merchant_id}"


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class MerchantPlacement:
    merchant_id: str
    server: str  # "host:port"
    database: str

    @functools.cached_property
    def address(self) -> DatabaseAddress:
        # Cached: every call on the merchant looks its pool up by this address.
        return DatabaseAddress(self.server, self.database)


class MerchantDirectory:
    """Maps merchants to their databases, creates them on demand and lends connections to them.

    `migrations` are the service's own merchant-database migrations; the kit's are
    applied before them. One directory serves the whole process: its connection ceiling
    is `settings.db_max_connections`.
    """

    def __init__(self, settings: ServiceSettings, migrations: Sequence[MigrationSource] = ()) -> None:
        longest_name = merchant_database_name(settings, _LONGEST_MERCHANT_ID)
        if len(longest_name.encode()) > _MAX_IDENTIFIER_BYTES:
            raise ValueError(
                f"db_prefix plus service_name are too long: database names such as {longest_name!r} "
                f"would exceed PostgreSQL's {_MAX_IDENTIFIER_BYTES}-byte identifiers"
            )
        self._settings = settings
        self._merchant_migrations = [KIT_MIGRATIONS, *migrations]
        self._placement_server = server_address(settings.pg_host, settings.pg_port)
        self._control = DatabaseAddress(self._placement_server, control_database_name(settings))
        self._pools = BoundedPools(
            user=settings.pg_user,
            password=settings.pg_password.get_secret_value() or None,
            application_name=settings.service_name,
            max_pools=settings.db_max_pools,
            pool_max_size=settings.db_pool_max_size,
            max_connections=settings.db_max_connections,
            acquire_timeout=settings.db_command_timeout_seconds,
            command_timeout=settings.db_command_timeout_seconds,
            idle_connection_seconds=settings.db_idle_connection_seconds,
        )
        self._placements: dict[str, MerchantPlacement] = {}
        self._provisioning: dict[str, asyncio.Task[MerchantPlacement]] = {}
        self._started = False

    async def start(self) -> None:
        """Creates and migrates the control database if needed and loads the known placements."""
        await self._create_database(self._control)
        await self._pools.pin(self._control, max_size=_CONTROL_POOL_MAX_SIZE)
        self._started = True
        # The migrations hold a session advisory lock: their connection is reset before reuse.
        async with self._pools.connection(self._control, changes_session=True) as conn:
            await apply_migrations(conn, [CONTROL_MIGRATIONS])
            rows = await conn.fetch(
                "SELECT merchant_id, server, database FROM merchant_databases WHERE status = 'ready'"
            )
        for row in rows:
            self._placements[row["merchant_id"]] = MerchantPlacement(
                row["merchant_id"], row["server"], row["database"]
            )

    async def close(self) -> None:
        await asyncio.gather(*self._provisioning.values(), return_exceptions=True)
        await self._pools.close()

    async def provision(self, merchant_id: str) -> MerchantPlacement:
        """The merchant's placement, creating and migrating its database the first time."""
        violations = Violations()
        violations.require(
            is_valid_merchant_id(merchant_id), "merchant_id", f"must match {MERCHANT_ID_PATTERN.pattern}"
        )
        violations.raise_if_any()
        placement = self._placements.get(merchant_id)
        if placement is not None:
            return placement
        task = self._provisioning.get(merchant_id)
        if task is None:
            task = asyncio.create_task(self._provision(merchant_id))
            self._provisioning[merchant_id] = task
            task.add_done_callback(lambda _: self._provisioning.pop(merchant_id, None))
        # Shielded: a caller that gives up must not cancel the work other callers wait for.
        return await asyncio.shield(task)

    async def is_provisioned(self, merchant_id: str) -> bool:
        try:
            await self._placement(merchant_id)
        except NotFound:
            return False
        return True

    async def merchant_ids(self) -> list[str]:
        """Every merchant whose database is ready, from the control database (other replicas' too)."""
        async with self.control_connection() as conn:
            rows = await conn.fetch(
                "SELECT merchant_id FROM merchant_databases WHERE status = 'ready' ORDER BY merchant_id"
            )
        return [row["merchant_id"] for row in rows]

    async def migrate_all(self) -> dict[str, list[str]]:
        """Applies pending migrations to every ready merchant database, one at a time (the deploy job).

        Returns the migrations applied, by merchant.
        """
        applied: dict[str, list[str]] = {}
        for merchant_id in await self.merchant_ids():
            placement = await self._placement(merchant_id)
            async with self._pools.connection(placement.address, changes_session=True) as conn:
                applied[merchant_id] = await apply_migrations(conn, self._merchant_migrations)
        return applied

    def connection(self, merchant_id: str) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A connection to the merchant's database; NotFound if it has none.

        It goes back to its pool without a reset: change session state (SET, LISTEN,
        session advisory locks) only inside a transaction, where it ends with the transaction.
        """
        placement = self._placements.get(merchant_id)
        if placement is not None:
            # The path of nearly every call: no coroutine, no generator, one pool lookup.
            return self._pools.connection(placement.address)
        return self._connection_after_lookup(merchant_id)

    @asynccontextmanager
    async def _connection_after_lookup(self, merchant_id: str) -> AsyncIterator[asyncpg.Connection]:
        placement = await self._placement(merchant_id)
        async with self._pools.connection(placement.address) as conn:
            yield conn

    @asynccontextmanager
    async def transaction(
        self, merchant_id: str, *, isolation: IsolationLevel = "read_committed"
    ) -> AsyncIterator[asyncpg.Connection]:
        """A connection to the merchant's database inside a transaction, committed on exit."""
        async with self.connection(merchant_id) as conn, conn.transaction(isolation=isolation):
            yield conn

    def control_connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        if not self._started:
            raise RuntimeError("MerchantDirectory.start() has not been called")
        return self._pools.connection(self._control)

    async def _placement(self, merchant_id: str) -> MerchantPlacement:
        placement = self._placements.get(merchant_id)
        if placement is None and is_valid_merchant_id(merchant_id):
            # Another replica may have provisioned the merchant since this one started.
            async with self.control_connection() as conn:
                row = await conn.fetchrow(
                    """
                    SELECT server, database FROM merchant_databases
                    WHERE merchant_id = $1 AND status = 'ready'
                    """,
                    merchant_id,
                )
            if row is not None:
                placement = MerchantPlacement(merchant_id, row["server"], row["database"])
                self._placements[merchant_id] = placement
        if placement is None:
            raise NotFound(f"merchant '{merchant_id}' not found", reason="MERCHANT_NOT_FOUND")
        return placement

    async def _provision(self, merchant_id: str) -> MerchantPlacement:
        started = time.perf_counter()
        async with self.control_connection() as conn:
            # No conflict target: a racing insert of the same merchant may meet the unique
            # database name first, and only an untargeted ON CONFLICT covers every constraint.
            await conn.execute(
                """
                INSERT INTO merchant_databases (merchant_id, server, database, status)
                VALUES ($1, $2, $3, 'provisioning')
                ON CONFLICT DO NOTHING
                """,
                merchant_id,
                self._placement_server,
                merchant_database_name(self._settings, merchant_id),
            )
            row = await conn.fetchrow(
                "SELECT server, database, status FROM merchant_databases WHERE merchant_id = $1", merchant_id
            )
        placement = MerchantPlacement(merchant_id, row["server"], row["database"])
        if row["status"] != "ready":
            await self._create_database(placement.address)
            async with self._pools.connection(placement.address, changes_session=True) as conn:
                await apply_migrations(conn, self._merchant_migrations)
            async with self.control_connection() as conn:
                await conn.execute(
                    "UPDATE merchant_databases SET status = 'ready' WHERE merchant_id = $1", merchant_id
                )
            elapsed = time.perf_counter() - started
            PROVISION_SECONDS.observe(elapsed)
            log.info("merchant %s: database %s ready in %.3f s", merchant_id, placement.database, elapsed)
        self._placements[merchant_id] = placement
        return placement

    async def _create_database(self, address: DatabaseAddress) -> None:
        """Creates the database unless it exists; losing a creation race to another process is fine."""
        maintenance = DatabaseAddress(address.server, _MAINTENANCE_DATABASE)
        async with self._pools.direct_connection(maintenance) as admin:
            if await admin.fetchval("SELECT true FROM pg_database WHERE datname = $1", address.database):
                return
            try:
                # template0, not the default template1: CREATE DATABASE fails while anyone is
                # connected to its template, and nobody can connect to template0.
                name = quote_identifier(address.database)
                await admin.execute(f"CREATE DATABASE {name} TEMPLATE template0")
            except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                log.debug("database %s was created concurrently", address.database)
