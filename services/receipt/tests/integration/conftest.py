"""The receipt service end to end: the real catalog and receipt apps in this process, on port 0,
over PostgreSQL and RabbitMQ, with the ledger's events published on the exchange by the tests.

One pair of apps serves the whole session; each test works on merchants of its own. The run's
databases carry a unique prefix and are dropped at the end; its exchange (with its alternate
exchange and queue), the receipt consumers' queues and dead-letter exchanges, and the capture
queue are deleted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import grpc
import pytest
from tally_catalog.app import build_app as build_catalog
from tally_kit.testing import drop_databases, unique_prefix
from tally_receipt.app import build_app as build_receipt
from tally_receipt.testing import (
    Catalog,
    EventCapture,
    Ledger,
    Receipts,
    Stack,
    catalog_settings,
    delete_topology,
    receipt_settings,
)


@pytest.fixture(scope="session")
async def stack() -> AsyncIterator[Stack]:
    prefix = unique_prefix()
    exchange = f"{prefix}receipt.it"
    catalog_app = build_catalog(catalog_settings(prefix, exchange))
    amqp_url = catalog_app.settings.amqp_url.get_secret_value()
    ledger = Ledger(amqp_url, exchange)
    events = EventCapture(amqp_url, exchange)
    channels: list[grpc.aio.Channel] = []
    receipt_app = None
    settings = None
    try:
        await events.start()
        await ledger.start()
        catalog_port = await catalog_app.start()
        settings = receipt_settings(prefix, exchange, catalog_port)
        receipt_app = build_receipt(settings)
        receipt_port = await receipt_app.start()
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{catalog_port}"),
            grpc.aio.insecure_channel(f"127.0.0.1:{receipt_port}"),
        ]
        yield Stack(
            settings=settings,
            catalog_port=catalog_port,
            catalog=Catalog(catalog_app.settings, channels[0]),
            receipts=Receipts(settings, channels[1]),
            ledger=ledger,
            events=events,
        )
    finally:
        for channel in channels:
            await channel.close()
        if receipt_app is not None:
            await receipt_app.stop()
        await catalog_app.stop()
        await ledger.close()
        await events.close()
        connection = await aio_pika.connect(amqp_url)
        try:
            consumers = [settings.consumer_name] if settings is not None else []
            await delete_topology(await connection.channel(), exchange, consumers)
        finally:
            await connection.close()
        await drop_databases(catalog_app.settings, prefix)
