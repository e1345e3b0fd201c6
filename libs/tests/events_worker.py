"""Harness of the events tests, and the relay or consumer process their crash tests kill.

As a module (loaded by `test_events_layer.py`): merchant test databases with the kit's
outbox and inbox tables plus an `effects` table, `PoolDatabases` (the `MerchantDatabases`
protocol over one small asyncpg pool per merchant database), and the handler whose
effect the tests count.

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


async def create_merchant_databases(settings: ServiceSettings, merchant_ids: list[str]) -> None:
    admin = await _connect(settings, "postgres")
    try:
        for merchant_id in merchant_ids:
            await admin.execute(f'CREATE DATABASE "{database_name(settings, merchant_id)}"')
    finally:
        await admin.close()
    for merchant_id in merchant_ids:
        conn = await _connect(settings, database_name(settings, merchant_id))
        try:
            for migration in EVENTS_SCHEMA:
                await conn.execute(migration.read_text())
            await conn.execute(EFFECTS_TABLE)
        finally:
            await conn.close()


class PoolDatabases:
    """`MerchantDatabases` over one small pool per merchant test database."""

    def __init__(self, pools: dict[str, asyncpg.Pool]) -> None:
        self._pools = pools

    @classmethod
    async def open(cls, settings: ServiceSettings, merchant_ids: list[str]) -> PoolDatabases:
        pools = {}
        for merchant_id in merchant_ids:
            pools[merchant_id] = await asyncpg.create_pool(
                host=settings.pg_host,
                port=settings.pg_port,
                user=settings.pg_user,
                password=settings.pg_password.get_secret_value() or None,
                database=database_name(settings, merchant_id),
                min_size=0,
                max_size=3,
            )
        return cls(pools)

    async def merchant_ids(self) -> list[str]:
        return list(self._pools)

    @asynccontextmanager
    async def transaction(self, merchant_id: str) -> AsyncIterator[asyncpg.Connection]:
        async with self._pools[merchant_id].acquire() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def connection(self, merchant_id: str) -> AsyncIterator[asyncpg.Connection]:
        async with self._pools[merchant_id].acquire() as conn:
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
    databases = await PoolDatabases.open(settings, arguments.merchants.split(","))
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
