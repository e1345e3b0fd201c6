"""The catalog end to end: the real app in this process, on port 0, over PostgreSQL and RabbitMQ.

One app serves the whole session (starting it and provisioning merchant databases is the
expensive part); each test module works on merchants of its own. The run's databases carry
a unique prefix and are dropped at the end; its exchange, the exchange's alternate exchange
and queue, and the capture queue are deleted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from tally_catalog.app import build_app
from tally_catalog.settings import CatalogSettings
from tally_catalog.testing import Catalog, Databases, EventCapture, ServiceClock, catalog_settings
from tally_kit.server import ServiceApp
from tally_kit.testing import drop_databases


@pytest.fixture(scope="session")
async def app_settings() -> CatalogSettings:
    return catalog_settings()


@pytest.fixture(scope="session")
async def running_app(app_settings: CatalogSettings) -> AsyncIterator[tuple[ServiceApp, Catalog]]:
    events = EventCapture(app_settings.amqp_url.get_secret_value(), app_settings.events_exchange)
    clock = ServiceClock()
    app = build_app(app_settings, clock=clock)
    channel: grpc.aio.Channel | None = None
    try:
        # Bound before the app starts, so that the capture queue sees every event.
        await events.start()
        port = await app.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        yield app, Catalog(app_settings, channel, Databases(app_settings), events, clock)
    finally:
        if channel is not None:
            await channel.close()
        await app.stop()
        await events.close()
        await drop_databases(app_settings, app_settings.db_prefix)


@pytest.fixture(scope="session")
def catalog(running_app: tuple[ServiceApp, Catalog]) -> Catalog:
    return running_app[1]


@pytest.fixture(scope="session")
def app(running_app: tuple[ServiceApp, Catalog]) -> ServiceApp:
    return running_app[0]
