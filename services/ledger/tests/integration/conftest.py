"""The ledger end to end: the real catalog app and the real ledger app in this process, on
port 0, over PostgreSQL and RabbitMQ, the ledger reading the catalog over gRPC.

One pair of apps serves the session; each test works on merchants of its own. The run's
databases (both services') carry one unique prefix and are dropped at the end; each
service's exchange, its alternate exchange and queue, the capture queues and the ledger's
consumer queues (named after the prefix) are deleted.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tally_catalog.app import build_app as build_catalog_app
from tally_kit.testing import drop_databases, unique_prefix
from tally_ledger.app import build_app as build_ledger_app

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ledger_e2e import (
    Catalog,
    Databases,
    EventCapture,
    Ledger,
    catalog_settings,
    delete_consumer_topology,
    ledger_settings,
)


@dataclass(frozen=True)
class Suite:
    catalog: Catalog
    ledger: Ledger


@pytest.fixture(scope="session")
async def suite() -> AsyncIterator[Suite]:
    prefix = unique_prefix()
    catalog_config = catalog_settings(
        db_prefix=prefix, events_exchange=f"{prefix}catalog.e2e", db_max_pools=4
    )
    catalog_events = EventCapture(catalog_config.amqp_url.get_secret_value(), catalog_config.events_exchange)
    catalog_app = build_catalog_app(catalog_config)
    ledger_config = None
    ledger_app = None
    ledger_events = None
    channels: list[grpc.aio.Channel] = []
    try:
        # Bound before the apps start, so that the capture queues see every event.
        await catalog_events.start()
        catalog_port = await catalog_app.start()
        ledger_config = ledger_settings(prefix, f"127.0.0.1:{catalog_port}")
        ledger_events = EventCapture(ledger_config.amqp_url.get_secret_value(), ledger_config.events_exchange)
        await ledger_events.start()
        ledger_app = build_ledger_app(ledger_config)
        ledger_port = await ledger_app.start()
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in (catalog_port, ledger_port)]
        yield Suite(
            catalog=Catalog(catalog_config, channels[0], Databases(catalog_config), catalog_events),
            ledger=Ledger(ledger_config, channels[1], Databases(ledger_config), ledger_events),
        )
    finally:
        for channel in channels:
            await channel.close()
        if ledger_app is not None:
            await ledger_app.stop()
        if ledger_config is not None:
            await delete_consumer_topology(ledger_config)
        await catalog_app.stop()
        if ledger_events is not None:
            await ledger_events.close()
        await catalog_events.close()
        await drop_databases(catalog_config, prefix)


@pytest.fixture(scope="session")
def catalog(suite: Suite) -> Catalog:
    return suite.catalog


@pytest.fixture(scope="session")
def ledger(suite: Suite) -> Ledger:
    return suite.ledger
