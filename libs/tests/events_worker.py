"""Harness of the events tests, and the relay or consumer process their crash tests kill.

As a module (loaded by `test_events_layer.py`): `PoolDatabases`, the `MerchantDatabases`
protocol over merchant test databases holding the kit's outbox and inbox tables plus an
`effects` table, and the handler whose effect the tests count.

As a script, with settings from `TALLY_*` variables (`TALLY_FAILPOINTS` arms failpoints):

    python events_worker.py relay --producer NAME --merchants acme,globex
    python events_worker.py consumer --service NAME --merchants acme,globex

It prints `ready` once started and runs until SIGTERM (graceful stop) or a failpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
import asyncpg
import tally_kit
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message
from tally.common.v1.event_pb2 import EventEnvelope
from tally_kit.errors import NotFound
from tally_kit.events import EventConsumer, OutboxRelay
from tally_kit.events.topology import dead_letter_exchange_name, events_queue_name, parking_queue_name
from tally_kit.settings import ServiceSettings

EVENT_TYPE = "test.thing_happened"
# The payload type of the tests' events; the consumer finds it in the descriptor pool
# only because this module imports it, as a service's handlers import their payloads.
Payload = wrappers_pb2.StringValue
KIT_MIGRATIONS = Path(tally_kit.__file__).parent / "migrations"
EVENTS_SCHEMA = [KIT_MIGRATIONS / "0002_outbox.sql", KIT_MIGRATIONS / "0003_inbox.sql"]

# The effect a test handler has: duplicates would show as several rows for one event id.
EFFECTS_TABLE = """
CREATE TABLE effects (
    id bigserial PRIMARY KEY,
    event_id uuid NOT NULL,
    merchant_id text NOT NULL,
    event_type text NOT NULL
)
"""


def database_name(settings: ServiceSettings, merchant_id: str) -> str:
    return f"{settings.db_prefix}events__m_{merchant_id}"


async def _connect(settings: ServiceSettings, database: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_user,
        password=settings.pg_password.get_secret_value() or None,
        database=database,
    )


class PoolDatabases:
    """`MerchantDatabases` over one small pool per merchant test database.

    Like `MerchantDirectory`, it raises `NotFound` for a merchant it has no database for
    and creates one with `provision`.
    """

    def __init__(self, settings: ServiceSettings) -> None:
        self._settings = settings
        self._pools: dict[str, asyncpg.Pool] = {}
        self._provisioning = asyncio.Lock()

    async def provision(self, merchant_id: str) -> None:
        """Create the merchant's database with the outbox, inbox and effects tables, once."""
        async with self._provisioning:
            if merchant_id in self._pools:
                return
            database = database_name(self._settings, merchant_id)
            admin = await _connect(self._settings, "postgres")
            try:
                await admin.execute(f'CREATE DATABASE "{database}"')
            finally:
                await admin.close()
            conn = await _connect(self._settings, database)
            try:
                for migration in EVENTS_SCHEMA:
                    await conn.execute(migration.read_text())
                await conn.execute(EFFECTS_TABLE)
            finally:
                await conn.close()
            await self.attach(merchant_id)

    async def attach(self, merchant_id: str) -> None:
        """Open a pool to the merchant's existing database."""
        self._pools[merchant_id] = await asyncpg.create_pool(
            host=self._settings.pg_host,
            port=self._settings.pg_port,
            user=self._settings.pg_user,
            password=self._settings.pg_password.get_secret_value() or None,
            database=database_name(self._settings, merchant_id),
            min_size=0,
            max_size=3,
        )

    async def merchant_ids(self) -> list[str]:
        return list(self._pools)

    @asynccontextmanager
    async def transaction(self, merchant_id: str) -> AsyncIterator[asyncpg.Connection]:
        async with self.connection(merchant_id) as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def connection(self, merchant_id: str) -> AsyncIterator[asyncpg.Connection]:
        pool = self._pools.get(merchant_id)
        if pool is None:
            raise NotFound(f"merchant '{merchant_id}' not found", reason="MERCHANT_NOT_FOUND")
        async with pool.acquire() as conn:
            yield conn

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()


async def record_effect(conn: asyncpg.Connection, envelope: EventEnvelope, payload: Message) -> None:
    await conn.execute(
        "INSERT INTO effects (event_id, merchant_id, event_type) VALUES ($1, $2, $3)",
        uuid.UUID(envelope.event_id),
        envelope.merchant_id,
        envelope.event_type,
    )


async def delete_consumer_topology(channel: aio_pika.abc.AbstractChannel, service: str) -> None:
    for queue in (events_queue_name(service), parking_queue_name(service)):
        await channel.queue_delete(queue)
    await channel.exchange_delete(dead_letter_exchange_name(service))


async def _serve(arguments: argparse.Namespace) -> None:
    settings = ServiceSettings()
    databases = PoolDatabases(settings)
    for merchant_id in arguments.merchants.split(","):
        await databases.attach(merchant_id)
    if arguments.role == "relay":
        component: OutboxRelay | EventConsumer = OutboxRelay(settings, databases, producer=arguments.producer)
    else:
        component = EventConsumer(
            settings, databases, service=arguments.service, handlers={EVENT_TYPE: record_effect}
        )
    terminated = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminated.set)
    await component.start()
    print("ready", flush=True)
    await terminated.wait()
    await component.stop()
    await databases.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("role", choices=["relay", "consumer"])
    parser.add_argument("--merchants", required=True)
    parser.add_argument("--producer", default="test")
    parser.add_argument("--service", default="test")
    asyncio.run(_serve(parser.parse_args(sys.argv[1:])))


if __name__ == "__main__":
    main()
