"""Fixtures of the payment-event handler tests: a real catalog, the ledger's consumer on the
real RabbitMQ (queues named for this run) over the real PostgreSQL, and a publisher standing
in for the payment gateway. Databases, queues and exchanges of the run are removed at the end."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from tally_kit.auth import ServiceToken
from tally_kit.db import MerchantDirectory
from tally_kit.events.topology import (
    dead_letter_exchange_name,
    events_queue_name,
    parking_queue_name,
    unrouted_exchange_name,
    unrouted_queue_name,
)
from tally_kit.testing import drop_databases
from tally_ledger.catalog_client import GrpcCatalogReader
from tally_ledger.handlers import build_consumer
from tally_ledger.services import Ledger, MerchantGate
from tally_ledger.store import MIGRATIONS

# Helpers beside the job tests and the catalog harness: test folders are not packages and
# pytest runs with --import-mode=importlib, which puts no test folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "catalog_client"))

from catalog_harness import RunningCatalog
from handler_support import PaymentGateway, RecordingRelay, Subjects
from ledger_support import ledger_settings


@pytest.fixture(scope="session")
async def subjects() -> AsyncIterator[Subjects]:
    catalog = RunningCatalog()
    await catalog.start()
    settings = ledger_settings(catalog.target, consumer_delivery_limit=3)
    service = f"{settings.db_prefix}ledger"
    directory = MerchantDirectory(settings, [MIGRATIONS])
    reader = GrpcCatalogReader.open(catalog.target, service_token=ServiceToken(settings, subject="ledger"))
    relay = RecordingRelay()
    consumer = build_consumer(
        settings, directory, Ledger(reader), MerchantGate(directory, reader), relay, service=service
    )
    gateway = PaymentGateway(settings, service)
    try:
        await directory.start()
        await consumer.start()
        await gateway.start()
        yield Subjects(catalog, settings, directory, reader, relay, gateway)
    finally:
        await gateway.close()
        await consumer.stop()
        await reader.close()
        await directory.close()
        await drop_databases(settings, settings.db_prefix)
        await catalog.close()
        connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
        async with connection:
            channel = await connection.channel()
            for queue in (events_queue_name(service), parking_queue_name(service)):
                await channel.queue_delete(queue)
            await channel.exchange_delete(dead_letter_exchange_name(service))
            await channel.exchange_delete(settings.events_exchange)
            await channel.queue_delete(unrouted_queue_name(settings.events_exchange))
            await channel.exchange_delete(unrouted_exchange_name(settings.events_exchange))
